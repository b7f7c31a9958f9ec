"""relcohort's library: cohort store, synthetic cohorts, and (later) atlases, models, attribution, statistics."""
