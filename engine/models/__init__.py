"""Models and attribution: the CNNs, training ensembles from the store, relevance maps (LRP and
other methods) and their validation against ground truth and across members."""
