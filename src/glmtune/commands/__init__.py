"""One module per verb: `main(argv)` parses the command line, `run(...)` does the work in a few readable steps."""
