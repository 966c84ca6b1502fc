"""Command-line interface: one module per subcommand, each with ``add_parser(subparsers)``."""
