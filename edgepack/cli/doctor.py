from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor(as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
        """Check Python, backend libraries, devices (CPU, CUDA, Metal), free RAM and disk.

        Example: edgepack doctor --json
        """
        from ..doctor import diagnose

        report = diagnose()
        if as_json:
            print(json.dumps(report, indent=2))
            return
        c = Console()
        c.print(f"Python {report['python']} on {report['platform']}, {report['cpu_count']} CPUs")
        c.print(f"RAM {report['ram_free_gb']} GB free of {report['ram_total_gb']} GB; disk {report['disk_free_gb']} GB free at {report['home']}")
        t = Table("library", "version", "for", "to install")
        for name, lib in report["libraries"].items():
            t.add_row(name, lib["version"] or "[red]missing[/]", lib["for"], lib.get("install", ""))
        c.print(t)
        t = Table("backend", "cpu", "cuda", "metal")
        for name, devs in report["backends"].items():
            t.add_row(name, *("yes" if devs.get(d) else "no" for d in ("cpu", "cuda", "metal")))
        c.print(t)
        for name, devs in report["backends"].items():
            for where, why in ({"import": devs["error"]} if "error" in devs else devs.get("errors", {})).items():
                c.print(f"[red]{name} {where}:[/] {escape(why)}")
        if not any(d.get("cuda") for d in report["backends"].values()):
            c.print("No CUDA backend. " + " ".join(f"For {name} on CUDA, {escape(how)}." for name, how in report["gpu_install"].items()))
