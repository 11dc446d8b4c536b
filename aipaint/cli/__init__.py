"""The ``aipaint`` command line."""
