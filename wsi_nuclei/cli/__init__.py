"""The command line: thin commands, one library call each."""
