"""The `opt-lm` command line tool (see `opt_cli.main`) and the embedded default model."""
