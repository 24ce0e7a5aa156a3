"""Project commands: `flen init`, `flen ui` (the Dagster UI) and `flen demo`."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from flen_assets.commands.common import (
    ProjectOpt,
    fail,
    fail_run,
    print_review_hint,
    report,
    resolve_project,
    run_job,
)
from flen_assets.runs import DEMO_RUN_CONFIG, init_project, materialize_partition, review_gate_stops
from flen_resources.project import PROJECT_ENV, Project, flen_command, validate_slug


def init(project: ProjectOpt = None) -> None:
    """Initialise a project: data/, inbox/, DVC, lineage, Dagster instance (local, or the cluster's: FLEN_DEPLOYMENT)."""
    from flen_resources.deployment import cluster_settings

    proj = resolve_project(project, create=True)
    init_project(proj)
    cluster = cluster_settings()
    if cluster is None:
        typer.echo(f"project ready at {proj.root}\n  DAGSTER_HOME={proj.dagster_home}\n  DVC remote: {proj.dvc_remote_dir}")
        return
    typer.echo(f"project ready at {proj.root} (deployment: cluster)\n  Dagster instance: {cluster.pg_where}\n"
               f"  DVC remote: {cluster.dvc_remote_url}\n  lineage: s3://{cluster.lineage_key()} "
               f"(mirrored in {proj.relative(proj.lineage_dir)})")


WORKSPACE_YAML = """\
# Written by flen for a project folder without its own workspace.yaml.
load_from:
  - python_module:
      module_name: flen_assets.definitions
      location_name: flenwheel
"""


def workspace_file(project: Project) -> Path:
    """The project's workspace.yaml, or one written under .flen/ that loads the same code location."""
    own = project.root / "workspace.yaml"
    if own.is_file():
        return own
    generated = project.state_dir / "workspace.yaml"
    if not generated.is_file() or generated.read_text() != WORKSPACE_YAML:
        generated.parent.mkdir(parents=True, exist_ok=True)
        generated.write_text(WORKSPACE_YAML)
    return generated


def dagster_env(project: Project) -> dict[str, str]:
    """The environment of a Dagster process for `project` (webserver, daemon, the runs they launch)."""
    return {**os.environ, PROJECT_ENV: str(project.root), "DAGSTER_HOME": str(project.dagster_home)}


def ui(host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps the UI local.")] = "127.0.0.1", port: int = 3000, project: ProjectOpt = None) -> None:
    """Serve the Dagster UI and run the daemon (which runs what the UI launches: queued runs, backfills,
    sensors, schedules) on this project's instance, as `dagster dev` does. The UI binds 127.0.0.1
    unless told otherwise; Ctrl+C stops both."""
    import signal

    from flen_resources.supervisor import ServiceExited, Services, signals_as_interrupt

    proj = resolve_project(project)
    instance = init_project(proj, log=typer.echo)
    ordered = _iterations_ordered(instance)
    instance.dispose()
    workspace = str(workspace_file(proj))
    bin_dir = Path(sys.executable).parent
    webserver = [str(bin_dir / "dagster-webserver"), "-w", workspace, "-h", host, "-p", str(port)]
    daemon = [str(bin_dir / "dagster-daemon"), "run", "-w", workspace]
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    typer.echo(f"Dagster UI on {url}  (DAGSTER_HOME={proj.dagster_home})")
    typer.echo("dagster-daemon runs beside it: queued runs, backfills, sensors and schedules run while this is "
               "open. Ctrl+C stops both.")
    if not ordered:
        typer.secho(f"warning: {proj.dagster_home / 'dagster.yaml'} has no run limit on the tag flen/character "
                    "(edited by hand?): runs of one character may leave the queue together; they then fail fast "
                    "instead of reading an unfinished iteration. flen_assets/instance.py DAGSTER_YAML has the limit.",
                    fg=typer.colors.YELLOW, err=True)

    services = Services(dagster_env(proj), cwd=str(proj.root))
    code = 0
    # SIGINT too: a shell starts a background job with SIGINT ignored, and `kill -INT` must still stop it.
    with signals_as_interrupt(signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            services.start("daemon", daemon)
            services.start("webserver", webserver)
            threading.Thread(target=_say_when_ready, args=(services, url), daemon=True).start()
            services.watch()
        except KeyboardInterrupt:
            services.say("stopping the webserver and the daemon ...")
        except ServiceExited as exc:
            other = "the daemon" if exc.name == "webserver" else "the webserver"
            typer.secho(f"error: dagster-{exc.name} stopped by itself ({exc.how}); stopping {other}. Its last lines:",
                        fg=typer.colors.RED, err=True)
            for line in exc.tail[-12:]:
                typer.echo(f"  {exc.name} | {line}", err=True)
            code = 1
        finally:
            services.stop()
    typer.echo("stopped the Dagster UI and daemon")
    raise typer.Exit(code)


def _say_when_ready(services, url: str, timeout_s: float = 600.0) -> None:
    """Say where the UI is once the webserver answers (it logs "Serving" before it binds the port)."""
    import urllib.request

    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through $http_proxy
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and services.services["webserver"].proc.poll() is None:
        try:
            with direct.open(f"{url}/server_info", timeout=5) as answer:
                if answer.status == 200:
                    services.say(f"ready: open {url}")
                    return
        except OSError:
            pass
        time.sleep(0.5)


def _iterations_ordered(instance) -> bool:
    """Whether the instance's run queue lets one run per character out at a time (dagster.yaml's limit)."""
    from flen_assets.instance import CHARACTER_TAG

    queue = instance.get_concurrency_config().run_queue_config
    limits = queue.tag_concurrency_limits if queue else []
    return any(limit.get("key") == CHARACTER_TAG and limit.get("limit") == 1
               and (limit.get("value") or {}).get("applyLimitPerUniqueValue") for limit in limits)


def demo(project: ProjectOpt = None, character: str = "astronaut",
         iterations: Annotated[int, typer.Option(min=1, max=5, help="How many flywheel iterations.")] = 2,
         review: Annotated[Optional[str], typer.Option(
             help="Set the character's review policy first: auto (gates decide), required (a human reviews every "
                  "image that passed the gates: the run stops at the review gate) or mixed. Default: leave it.")]
         = None) -> None:
    """Build the embedded sample character and run the whole flywheel (v1, v2) on the tiny pack."""
    from flen_assets.demo_data import write_sample_inbox
    from flen_assets.review.policy import POLICIES, ReviewPolicy, character_policy, set_character_policy

    proj = resolve_project(project, create=True)
    if review is not None and review not in POLICIES:
        fail(f"unknown review policy {review!r}: use one of {', '.join(POLICIES)}")
    started = time.time()
    init_project(proj)
    if review is not None:
        current = character_policy(proj, validate_slug(character))
        set_character_policy(proj, character, ReviewPolicy(review, current.margin))
    typer.echo(f"review policy of {character}: {character_policy(proj, validate_slug(character)).policy}")
    files = write_sample_inbox(proj.inbox_for(validate_slug(character)))
    typer.echo(f"sample inbox: {len(files)} files in {proj.inbox_for(character)} "
               "(the astronaut photo in several framings and encodings, another person, a face-less photo, "
               "a duplicate, a truncated JPEG and a text file named .png)")
    typer.echo("embedded defaults: the tiny model pack (random weights, real architectures) at CPU-sized settings. "
               "Its Qwen edits and FLUX generations are noise, so the face gate rejects them and the identity "
               "consistency is 0%: expected — the plumbing is what the demo shows.")
    for n in range(1, iterations + 1):
        typer.echo(f"\n== {character}|v{n} ==")
        # vN explicitly (not `flen iterate`), so running the demo again re-materializes the same
        # partitions, which reproduces the same versions, instead of adding v3.
        result = run_job(proj, lambda n=n: materialize_partition(proj, character, f"v{n}", DEMO_RUN_CONFIG,
                                                                 "flywheel_job", log=typer.echo))
        report(proj, result)
        if not result.success:
            stops = review_gate_stops(result)
            if not stops:
                fail_run(proj, result, character, f"v{n}")
            # Not an error: the policy asked for a human, and the run waits for one.
            print_review_hint(proj, character, f"v{n}", stops)
            typer.echo(f"\nthe demo stopped at {character}|v{n}'s review gate after {time.time() - started:.0f}s; "
                       "run it again once the images are decided.")
            return
    last = f"v{iterations}"
    typer.echo(f"\n{iterations} iteration(s) of '{character}' in {time.time() - started:.0f}s.")
    typer.echo(f"  training set:  {proj.partition_dir('training_set', character, last)}")
    typer.echo(f"  LoRA:          {proj.partition_dir('flux_lora', character, last)}")
    typer.echo(f"  evaluation:    {proj.partition_dir('lora_eval', character, last)}/contact_sheet.png, history.png, "
               "evolution.png, identity_by_step.png, checkpoint_grid.png")
    typer.echo(f"  checkpoints:   {flen_command(proj, 'eval', character, last)}   (promote another: "
               f"{flen_command(proj, 'promote', character, last, '--step', 'S')})")
    typer.echo(f"  lineage:       {flen_command(proj, 'lineage', character, last)}")
    typer.echo(f"  export:        {flen_command(proj, 'export', character, last, '--to', f'export/{character}-{last}')}")
    typer.echo(f"  Dagster UI:    {flen_command(proj, 'ui')}   (then open http://127.0.0.1:3000, Assets -> {character}|{last})")
