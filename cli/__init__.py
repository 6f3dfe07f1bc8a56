"""The `dt` command-line tool."""
