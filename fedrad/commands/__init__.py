"""The ``fedrad`` command and its subcommands: the top layer, which nothing else imports.

:mod:`~fedrad.commands.cli` parses the command line into a ``RunConfig`` once and dispatches to
``synth``, ``simulate``, ``evaluate``, ``demo``, ``site check`` and ``import-npz``; each
subcommand drives ``client`` and ``server`` as a user would.
"""
