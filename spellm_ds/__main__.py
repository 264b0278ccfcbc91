"""``python -m spellm_ds SUBCOMMAND``: the ``spellm`` command (:mod:`launch.spellm`)."""

from launch.spellm import main

main()
