"""The ``metafew`` command line (``metafew.cli.main:main``); one module per subcommand."""
