"""The ``captioning`` command line: one module per command, :mod:`captioning.commands.main` the
entry point. Commands parse options, call the library and report; they hold no model maths."""
