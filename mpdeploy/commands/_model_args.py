"""Model-loading and preprocessing flags shared by analyze / prune / build (torch-free, so `--help` stays fast)."""

from mpdeploy.commands.arguments import add_model_arguments  # noqa: F401  (one definition: mpdeploy/commands/arguments.py)
