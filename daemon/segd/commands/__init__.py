"""One module per `segd` command: its parser and its body."""
