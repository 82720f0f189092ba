"""The `refimpl` command: thin subcommands over library functions (`main`), and the demo."""
