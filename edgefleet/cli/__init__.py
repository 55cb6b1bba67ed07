"""`edgefleet <command>`: the services (`inference`, ...), and the tools beside them."""

# One module per command group, composed here and nothing else (as Roboflow's inference_cli/main.py
# composes server.py, cloud.py and benchmark.py). The unnamed services app puts its commands at the top.
from __future__ import annotations

import typer

from edgefleet.cli import bench, model, pki, plugin, rollout, s3, services, simulate, telemetry

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None, help=__doc__)
app.add_typer(services.app)
app.add_typer(model.app, name="model")
app.add_typer(pki.broker_app, name="broker")
app.add_typer(pki.certs_app, name="certs")
app.add_typer(rollout.app, name="rollout")
app.add_typer(bench.app, name="bench")
app.add_typer(pki.keys_app, name="keys")
app.add_typer(telemetry.app, name="telemetry")
app.add_typer(s3.app, name="s3")
app.add_typer(plugin.app, name="plugin")
app.add_typer(simulate.app, name="simulate")
