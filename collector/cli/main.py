"""bbprobe-collector command line: the group, and the commands of each module of this
package joined to it. Thin: parse flags, call the services, print.

Errors are caught once per command (cli/common.py, handle_errors) and printed as one
line, never as a traceback: exit 1 for operational errors, 2 for bad configuration or
arguments.
"""

from __future__ import annotations

import click

from collector import __version__
from collector.cli import alerts, fleet, probes, reports, results, serve, store, tickets, verify
from collector.cli import export as export_command
from collector.cli import partitions as partitions_command
from collector.cli.common import shared_options


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bbprobe-collector")
@shared_options
@click.pass_context
def main(ctx: click.Context) -> None:
    """bbprobe collector: stores probe results, serves measurement endpoints, and checks
    them against the Allegato 2 targets."""
    ctx.ensure_object(dict)


for _module in (serve, probes, reports, store, fleet, alerts, results, tickets, verify):
    for _command in _module.COMMANDS:
        main.add_command(_command)
main.add_command(export_command.export)
main.add_command(partitions_command.partitions_group)
