"""One module per DVC stage; each has a plain function at its core and ``main(cfg)`` for the CLI."""
