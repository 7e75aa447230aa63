"""One module per stage: its loss, its data, its evaluation. The plumbing is in raystages.train."""
