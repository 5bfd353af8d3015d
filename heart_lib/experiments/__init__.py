"""One module per notebook: its `Params` and the experiment functions it calls."""
