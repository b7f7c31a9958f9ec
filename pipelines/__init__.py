"""The catalog schema, the stages, the runner and the ``relcohort`` command line."""
