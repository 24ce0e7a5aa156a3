"""`flen`: the command line of FLENwheel (init, characters, runs, lineage, versions, UI, demo, train)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, NoReturn, Optional

import typer

from flen_assets.runs import DEMO_RUN_CONFIG, RunInterrupted, init_project, materialize_partition
from flen_resources.project import InvalidNameError, Project, validate_iteration, validate_slug

__all__ = ["DEMO_RUN_CONFIG", "app", "init_project", "materialize_partition"]  # run services, re-exported

if TYPE_CHECKING:
    from flen_resources.trainers.flux_lora import TrainItem

app = typer.Typer(help="FLENwheel: a handful of photos -> a faithful, versioned FLUX LoRA.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
character_app = typer.Typer(help="Characters (the `character` partition dimension).", no_args_is_help=True)
app.add_typer(character_app, name="character")
models_app = typer.Typer(help="Model weights: the embedded tiny pack and real models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
train_app = typer.Typer(help="Train LoRAs on a folder of captioned images.", no_args_is_help=True)
app.add_typer(train_app, name="train")

ProjectOpt = Annotated[Optional[Path], typer.Option("--project", help="Project folder (default: $FLEN_PROJECT_DIR or the checkout).")]


def _project(path: Optional[Path]) -> Project:
    if path is not None:
        os.environ["FLEN_PROJECT_DIR"] = str(path.resolve())
    return Project.discover()


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _run(project: Project, character: str, iteration: str, run_config: dict | None, job_name: str,
         start_at: str | None = None, restart: bool = False):
    """materialize_partition for a command: Ctrl-C and a full disk end it with one line, not a trace."""
    from flen_resources.disk import DiskFullError, disk_full_message, first_full_disk, is_disk_full

    try:
        return materialize_partition(project, character, iteration, run_config, job_name, start_at, log=typer.echo,
                                     restart=restart)
    except RunInterrupted as exc:
        typer.secho(f"interrupted: run {exc.run_id} is marked canceled and holds no pool slot; run the same "
                    "command again to resume (finished assets and training checkpoints are kept)",
                    fg=typer.colors.YELLOW, err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # the run's worker thread may still be inside a step: stop it here, as the shell expects
    except DiskFullError as exc:  # said before the run started
        _fail(str(exc))
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        _fail(disk_full_message(first_full_disk([project.dagster_home, project.data_dir, project.lineage_dir])))


@app.command()
def init(project: ProjectOpt = None) -> None:
    """Initialise a project: data/, inbox/, DVC (local remote), lineage, Dagster instance."""
    proj = _project(project)
    init_project(proj)
    typer.echo(f"project ready at {proj.root}\n  DAGSTER_HOME={proj.dagster_home}\n  DVC remote: {proj.dvc_remote_dir}")


@character_app.command("add")
def character_add(name: str, from_dir: Annotated[Path, typer.Option("--from", help="Folder of photos to copy in.")],
                  iteration: str = "v1", project: ProjectOpt = None) -> None:
    """Copy photos into inbox/NAME (originals untouched) and register the character partition."""
    from flen_assets.partitions import add_partitions
    from flen_resources.intake import IntakeError, add_photos

    try:
        validate_slug(name)
        validate_iteration(iteration)
    except InvalidNameError as exc:
        _fail(str(exc))
    if not from_dir.is_dir():
        _fail(f"{from_dir} is not a folder")
    proj = _project(project)
    instance = init_project(proj)
    dest = proj.inbox_for(name)
    dest.mkdir(parents=True, exist_ok=True)
    try:  # regular files only, each read from one O_NOFOLLOW fd; links, pipes, subfolders refused and recorded
        report = add_photos(from_dir, dest)
    except IntakeError as exc:
        _fail(str(exc))
    for refused in report.refused:
        typer.echo(f"refused {refused.message} [{refused.code}]")
    key = add_partitions(instance, name, iteration)
    typer.echo(f"{len(report.copied)} file(s) copied to {dest}; {len(report.refused)} refused; partition {key} registered")


@character_app.command("list")
def character_list(project: ProjectOpt = None) -> None:
    """List registered characters and iterations."""
    from flen_assets.partitions import character_partitions, iteration_partitions

    instance = init_project(_project(project))
    typer.echo("characters: " + ", ".join(instance.get_dynamic_partitions(character_partitions.name)))
    typer.echo("iterations: " + ", ".join(instance.get_dynamic_partitions(iteration_partitions.name)))


@character_app.command("policy")
def character_policy_cmd(
        name: str,
        policy: Annotated[Optional[str], typer.Argument(help="auto | required | mixed (omit to show the current one)")]
        = None,
        margin: Annotated[Optional[float], typer.Option(help="mixed: borderline band around the identity threshold.")]
        = None,
        project: ProjectOpt = None) -> None:
    """Show or set a character's review policy (auto, required or mixed)."""
    from flen_assets.review.policy import POLICIES, ReviewPolicy, character_policy, policy_file, set_character_policy

    try:
        validate_slug(name)
    except InvalidNameError as exc:
        _fail(str(exc))
    proj = _project(project)
    current = character_policy(proj, name)
    if policy is None and margin is None:
        typer.echo(f"{name}: {current.policy} (margin {current.margin:g})")
        return
    if policy is not None and policy not in POLICIES:
        _fail(f"unknown review policy {policy!r}: use one of {', '.join(POLICIES)}")
    try:
        chosen = ReviewPolicy(policy or current.policy, current.margin if margin is None else margin)
    except ValueError as exc:
        _fail(str(exc))
    set_character_policy(proj, name, chosen)
    typer.echo(f"{name}: review policy {chosen.policy} (margin {chosen.margin:g}) in {policy_file(proj)}")


@app.command()
def review(character: Annotated[Optional[str], typer.Argument(help="Character to review (default: the index page).")]
           = None,
           iteration: Annotated[Optional[str], typer.Option(help="v1, v2, ... (default: the latest with pending "
                                                            "images, else the latest)")] = None,
           asset: Annotated[str, typer.Option(help="filtered_images or synthetic_batch")] = "filtered_images",
           port: Annotated[int, typer.Option(envvar="FLEN_REVIEW_PORT", help="Port to serve on.")] = 8765,
           host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps the page local.")] = "127.0.0.1",
           allowed_host: Annotated[Optional[list[str]], typer.Option(
               "--allowed-host", help="Another name the page may be reached by (Host header), e.g. this "
                                      "machine's DNS name when --host is not loopback; repeatable.")] = None,
           project: ProjectOpt = None) -> None:
    """Serve the review page: accept or reject gated images with the keyboard (binds 127.0.0.1)."""
    from flen_assets.review.server import serve
    from flen_assets.review.store import Partition, ReviewStore, base_url, review_url, validate_asset

    proj = _project(project)
    try:
        validate_asset(asset)
        if character is not None:
            validate_slug(character)
        if iteration is not None:
            validate_iteration(iteration)
    except InvalidNameError as exc:
        _fail(str(exc))
    # Serve an existing project only: `flen review` in the wrong folder must not turn it into one.
    if not (proj.lineage_dir.is_dir() and proj.data_dir.is_dir()):
        _fail(f"{proj.root} is not a FLENwheel project (no .flen/lineage/ or data/): "
              "run it in a project, pass --project DIR, or create one with `flen init`")
    url = base_url(host, port) + "/"
    if character is not None:
        store = ReviewStore(proj)
        parts = [p for p in store.partitions() if p.character == character and p.asset == asset
                 and (iteration is None or p.iteration == iteration)]
        if not parts:
            _fail(f"no published {asset} for {character}" + (f"|{iteration}" if iteration else "")
                  + f": materialize it first (flen materialize {character} {iteration or 'v1'})")
        if iteration is None:  # newest first; prefer one that still has pending images
            parts = [p for p in parts if store.pending(p)] or parts
        part: Partition = parts[0]
        pending = store.pending(part)
        url = review_url(part.character, part.iteration, part.asset, port=port, host=host)
        typer.echo(f"{part.asset} {part.character}|{part.iteration}: {pending} image(s) pending")
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: binding {host} lets other machines make review decisions", fg=typer.colors.YELLOW)
    typer.echo(f"review page on {url}   (keys: a accept, r reject, u undo, j/k next/previous; ctrl+c to stop)")
    serve(proj, host=host, port=port, allowed_hosts=tuple(allowed_host or ()))


def _report(result) -> None:
    """One line per step: what it materialized, or why it failed."""
    from flen_resources.disk import disk_full_message, looks_like_disk_full

    for event in result.all_events:
        if event.event_type_value == "ASSET_MATERIALIZATION":
            mat = event.event_specific_data.materialization
            meta = {k: v.value for k, v in mat.metadata.items()
                    if k in ("accepted", "rejected", "pending", "edits", "images", "threshold", "final_loss",
                             "identity_consistency", "generated", "triplets", "trained", "dvc_md5")}
            typer.echo(f"  ✓ {mat.asset_key.to_user_string():20s} {meta}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            check = event.event_specific_data
            if check.check_name in REVIEW_CHECKS and not check.passed:
                pending = check.metadata.get("pending")
                typer.secho(f"  ⏸ {check.asset_key.to_user_string():20s} review gate: "
                            f"{pending.value if pending else '?'} image(s) await human review", fg=typer.colors.YELLOW)
        elif event.event_type_value == "STEP_FAILURE":
            message = root_cause(event.event_specific_data.error)
            if "blocking asset check failed" in message and any(c in message for c in REVIEW_CHECKS):
                continue  # said above, as the review gate
            if looks_like_disk_full(message) and "disk full:" not in message:
                message = disk_full_message(Project.discover().data_dir)
            typer.secho(f"  ✗ {event.step_key}: {message}", fg=typer.colors.RED)


REVIEW_CHECKS = ("review_complete", "synthetic_review_complete")


def root_cause(error) -> str:
    """The first line of the innermost error of a step failure: what the user can act on, not Dagster's wrapper."""
    while getattr(error, "cause", None) is not None:
        error = error.cause
    return error.message.strip().splitlines()[0] if error.message.strip() else error.cls_name


def review_gate_stops(result) -> list[tuple[str, int]]:
    """(asset, pending) for each review check that failed in a run: the run stopped at the review gate."""
    stops = []
    for event in result.all_events:
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            check = event.event_specific_data
            if check.check_name in REVIEW_CHECKS and not check.passed:
                pending = check.metadata.get("pending")
                stops.append((check.asset_key.to_user_string(), int(pending.value) if pending else 0))
    return stops


def project_option() -> str:
    """` --project DIR` when the project was chosen with --project or $FLEN_PROJECT_DIR: a command
    printed for the user names it, since a new shell would not know it."""
    chosen = os.environ.get("FLEN_PROJECT_DIR")
    return f" --project {shlex.quote(chosen)}" if chosen else ""


def _print_review_hint(character: str, iteration: str, stops: list[tuple[str, int]]) -> None:
    from flen_assets.review.store import review_command, review_url

    where = project_option()
    for asset, pending in stops:
        typer.secho(f"\n{character}|{iteration} stopped at the review gate: {pending} image(s) of {asset} await "
                    "a human decision.", fg=typer.colors.YELLOW, bold=True)
        typer.echo(f"  review them:   {review_command(character, iteration, asset)}{where}")
        typer.echo(f"  then open:     {review_url(character, iteration, asset)}")
        typer.echo(f"  and continue:  flen materialize {character} {iteration} --all --from {asset}{where}"
                   "   (or run the demo again)")


@app.command()
def materialize(character: str, iteration: Annotated[str, typer.Argument(help="Iteration, v1, v2, ...")] = "v1",
                project: ProjectOpt = None,
                config: Annotated[Optional[Path], typer.Option(help="Run config (JSON or YAML).")] = None,
                whole: Annotated[bool, typer.Option("--all", help="The whole iteration (flywheel_job): LoRA, "
                                                    "evaluation, synthetic batch, triplets, qwen adapter.")] = False,
                start_at: Annotated[Optional[str], typer.Option(
                    "--from", help="Only this asset and what is downstream of it, e.g. filtered_images after a "
                                   "review (the edits are not made again).")] = None,
                restart: Annotated[bool, typer.Option(
                    "--restart", help="Rebuild every asset even when the last run of this command died or was "
                                      "stopped midway (by default it resumes after the assets that run finished).")]
                = False,
                ) -> None:
    """Materialize sources -> training set (or, with --all, the whole iteration) for CHARACTER ITERATION."""
    import yaml

    try:
        validate_slug(character)
        validate_iteration(iteration)
    except InvalidNameError as exc:
        _fail(str(exc))
    run_config = yaml.safe_load(config.read_text()) if config else None
    result = _run(_project(project), character, iteration, run_config, "flywheel_job" if whole else "training_set_job",
                  start_at, restart)
    _report(result)
    if not result.success:
        stops = review_gate_stops(result)
        if stops:
            _print_review_hint(character, iteration, stops)
        _fail(f"run {result.run_id} " + ("stopped at the review gate" if stops else "failed"))
    typer.echo(f"run {result.run_id} succeeded")


@app.command()
def lineage(character: str, iteration: str, asset: str = "training_set", project: ProjectOpt = None,
            as_json: Annotated[bool, typer.Option("--json", help="Print JSON rows instead of a tree.")] = False) -> None:
    """Trace every image of a partition back to the source files, with the operations applied."""
    from flen_resources.lineage import LineageStore

    try:
        validate_slug(character)
        validate_iteration(iteration)
    except InvalidNameError as exc:
        _fail(str(exc))
    proj = _project(project)
    rows = LineageStore(proj.lineage_dir).trace(character, iteration, asset)
    if as_json:
        typer.echo(json.dumps(rows, indent=1, default=str))
        return
    if not rows:
        _fail(f"no lineage for {asset} {character}|{iteration}: materialize it first")
    from flen_assets.lineage_view import render_header, render_tree

    store = LineageStore(proj.lineage_dir)
    runs = store.rows("SELECT asset, params, models FROM runs WHERE character=$c AND iteration=$i "
                      "QUALIFY row_number() OVER (PARTITION BY asset ORDER BY finished_at DESC) = 1",
                      {"c": character, "i": iteration})
    artifacts = {r["asset"]: r["dvc_md5"] for r in store.rows(
        "SELECT asset, dvc_md5 FROM latest_artifacts WHERE character=$c AND iteration=$i",
        {"c": character, "i": iteration})}
    typer.echo(render_header(runs, artifacts, character, iteration))
    typer.echo("")
    typer.echo(render_tree(asset, character, iteration, rows))


@app.command()
def sql(query: str, project: ProjectOpt = None) -> None:
    """Run SQL against the lineage views (runs, artifacts, images, edges, members, decisions, metrics)."""
    from flen_resources.lineage import LineageStore

    with LineageStore(_project(project).lineage_dir).connect() as con:
        try:
            typer.echo(str(con.sql(query)))  # DuckDB's own table rendering
        except Exception as exc:  # duckdb raises one type per SQL error class
            _fail(f"SQL error: {exc}")


@app.command()
def versions(asset: str, character: str, iteration: str, project: ProjectOpt = None) -> None:
    """List the published versions (DVC md5) of one partition, newest first."""
    from flen_resources.lineage import LineageStore

    rows = LineageStore(_project(project).lineage_dir).rows(
        "SELECT created_at, dvc_md5, n_files, run_id FROM artifacts WHERE asset=$a AND character=$c AND iteration=$i "
        "ORDER BY created_at DESC", {"a": asset, "c": character, "i": iteration})
    if not rows:
        _fail(f"no published version of {asset} {character}|{iteration}")
    for r in rows:
        typer.echo(f"{r['created_at']:%Y-%m-%d %H:%M:%S}  {r['dvc_md5']}  {r['n_files']:5d} files  run {r['run_id'][:8]}")


@app.command()
def checkout(asset: str, character: str, iteration: str,
             md5: Annotated[str, typer.Argument(help="DVC md5 from `flen versions`, or a unique prefix of 8+ hex.")],
             project: ProjectOpt = None) -> None:
    """Restore an earlier version (by DVC md5, see `flen versions`) of a partition folder."""
    from flen_resources.lineage import LineageStore, VersionLookupError
    from flen_resources.storage import DvcStore

    proj = _project(project)
    try:
        version = LineageStore(proj.lineage_dir).find_version(asset, character, iteration, md5)
    except VersionLookupError as exc:
        _fail(str(exc))
    path = DvcStore(proj).restore(asset, character, iteration, version.dvc_file)
    typer.echo(f"restored {path} to {version.dvc_md5}")


WORKSPACE_YAML = """\
# Written by flen for a project folder without its own workspace.yaml.
load_from:
  - python_module:
      module_name: flen_assets.definitions
      location_name: flenwheel
"""


def _workspace_file(project: Project) -> Path:
    """The project's workspace.yaml, or one written under .flen/ that loads the same code location."""
    own = project.root / "workspace.yaml"
    if own.is_file():
        return own
    generated = project.state_dir / "workspace.yaml"
    if not generated.is_file() or generated.read_text() != WORKSPACE_YAML:
        generated.parent.mkdir(parents=True, exist_ok=True)
        generated.write_text(WORKSPACE_YAML)
    return generated


@app.command()
def ui(host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps the UI local.")] = "127.0.0.1", port: int = 3000, project: ProjectOpt = None) -> None:
    """Serve the Dagster UI on this project's instance (binds 127.0.0.1 unless told otherwise)."""
    proj = _project(project)
    init_project(proj, log=typer.echo)
    exe = Path(sys.executable).with_name("dagster-webserver")
    args = [str(exe), "-w", str(_workspace_file(proj)), "-h", host, "-p", str(port)]
    typer.echo(f"Dagster UI on http://{host}:{port}  (DAGSTER_HOME={proj.dagster_home})")
    os.execv(args[0], args)


def iterate_character(project: Project, character: str, run_config: dict | None = None):
    """Add v(N+1) after the last complete iteration N and run the whole flywheel for it."""
    done = project.latest_iteration(character)
    if done == 0:
        _fail(f"{character} has no complete iteration yet: run `flen materialize {character} v1 --all` first")
    nxt = f"v{done + 1}"
    typer.echo(f"{character}: v{done} is complete (synthetic batch published); launching {nxt}")
    return nxt, _run(project, character, nxt, run_config, "flywheel_job")


@app.command()
def iterate(character: str, project: ProjectOpt = None,
            config: Annotated[Optional[Path], typer.Option(help="Run config (JSON or YAML).")] = None,
            demo_settings: Annotated[bool, typer.Option(help="Use the demo's CPU-sized settings.")] = False) -> None:
    """Add the next iteration of CHARACTER (v(N+1) after the last complete vN) and run it."""
    import yaml

    validate_slug(character)
    run_config = DEMO_RUN_CONFIG if demo_settings else (yaml.safe_load(config.read_text()) if config else None)
    nxt, result = iterate_character(_project(project), character, run_config)
    _report(result)
    if not result.success:
        _fail(f"run {result.run_id} for {character}|{nxt} failed")
    typer.echo(f"{character}|{nxt} done (run {result.run_id})")


@app.command()
def export(character: str, iteration: str, dest: Annotated[Path, typer.Option("--to", help="Folder to write.")],
           project: ProjectOpt = None) -> None:
    """Write a training folder ai-toolkit and kohya accept (images + same-name .txt) plus the LoRA files."""
    validate_slug(character)
    validate_iteration(iteration)
    proj = _project(project)
    training = proj.partition_dir("training_set", character, iteration)
    if not (training / "manifest.parquet").is_file():
        _fail(f"training_set {character}|{iteration} is not materialized")
    if dest.exists() and any(dest.iterdir()):
        _fail(f"{dest} exists and is not empty")
    images = dest / "dataset"
    images.mkdir(parents=True, exist_ok=True)
    count = 0
    for item in sorted((training / "images").iterdir()):
        shutil.copyfile(item, images / item.name)
        count += item.suffix == ".png"
    lora = proj.partition_dir("flux_lora", character, iteration)
    copied = []
    for name in ("lora.safetensors", "lora_comfyui.safetensors", "loss_curve.png"):
        if (lora / name).is_file():
            target = dest / f"{character}_{iteration}_{name}"
            shutil.copyfile(lora / name, target)
            copied.append(target.name)
    typer.echo(f"{count} images with captions in {images}; LoRA files: {', '.join(copied) or 'none (not trained)'}")


@app.command()
def demo(project: ProjectOpt = None, character: str = "astronaut",
         iterations: Annotated[int, typer.Option(min=1, max=5, help="How many flywheel iterations.")] = 2,
         review: Annotated[Optional[str], typer.Option(
             help="Set the character's review policy first: auto (gates decide), required (a human reviews every "
                  "image that passed the gates: the run stops at the review gate) or mixed. Default: leave it.")]
         = None) -> None:
    """Build the embedded sample character and run the whole flywheel (v1, v2) on the tiny pack."""
    from flen_assets.demo_data import write_sample_inbox
    from flen_assets.review.policy import POLICIES, ReviewPolicy, character_policy, set_character_policy

    proj = _project(project)
    if review is not None and review not in POLICIES:
        _fail(f"unknown review policy {review!r}: use one of {', '.join(POLICIES)}")
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
        result = _run(proj, character, f"v{n}", DEMO_RUN_CONFIG, "flywheel_job")
        _report(result)
        if not result.success:
            stops = review_gate_stops(result)
            if not stops:
                _fail(f"demo run {result.run_id} failed")
            # Not an error: the policy asked for a human, and the run waits for one.
            _print_review_hint(character, f"v{n}", stops)
            typer.echo(f"\nthe demo stopped at {character}|v{n}'s review gate after {time.time() - started:.0f}s; "
                       "run it again once the images are decided.")
            return
    last = f"v{iterations}"
    typer.echo(f"\n{iterations} iteration(s) of '{character}' in {time.time() - started:.0f}s.")
    typer.echo(f"  training set:  {proj.partition_dir('training_set', character, last)}")
    typer.echo(f"  LoRA:          {proj.partition_dir('flux_lora', character, last)}")
    typer.echo(f"  evaluation:    {proj.partition_dir('lora_eval', character, last)}/contact_sheet.png, history.png")
    where = project_option()
    typer.echo(f"  lineage:       flen lineage {character} {last}{where}")
    typer.echo(f"  export:        flen export {character} {last} --to export/{character}-{last}{where}")
    typer.echo(f"  Dagster UI:    flen ui{where}   (then open http://127.0.0.1:3000, Assets -> {character}|{last})")


@models_app.command("tiny")
def models_tiny(force: Annotated[bool, typer.Option(help="Rebuild even if present.")] = False) -> None:
    """Build the embedded tiny model pack offline (random weights, real architectures)."""
    from flen_resources.models.tiny_pack import ensure_tiny_pack

    started = time.time()
    path = ensure_tiny_pack(force=force)
    typer.echo(f"tiny pack at {path} ({time.time() - started:.1f}s)")
    for item in sorted(path.iterdir()):
        typer.echo(f"  {item.name}")


@models_app.command("status")
def models_status() -> None:
    """Which models and LoRAs are available, from where (never downloads)."""
    from flen_assets.definitions import defs
    from flen_resources.models.loras import LoraError, resolve_lora
    from flen_resources.models.registry import MODELS
    from flen_resources.models.sources import ModelFolderError, ModelNotAvailable, models_dir, resolve_model

    editor = defs.resources["editor"]
    generator = defs.resources["generator"]
    configured = {"qwen-image-edit-2509": editor.qwen_model, "flux.1-dev": generator.flux_model}
    typer.echo(f"FLENwheel models folder: {models_dir()}")
    for key, spec in MODELS.items():
        source = configured[key]
        try:
            resolved = resolve_model(key, source, allow_download=False)
            typer.secho(f"✓ {key:22s} {source:32s} {resolved.kind:6s} {resolved.path}  ({resolved.ref})",
                        fg=typer.colors.GREEN)
        except (ModelNotAvailable, ModelFolderError) as exc:
            typer.secho(f"✗ {key:22s} {source:32s} {str(exc).splitlines()[0]}", fg=typer.colors.RED)
        if source != spec.hub_id:
            typer.echo(f"  real model: {spec.hub_id} (set FLEN_{'QWEN_EDIT' if 'qwen' in key else 'FLUX'}_MODEL)")
    for name, source in editor.qwen_loras.items():
        try:
            info = resolve_lora(name, source, "qwen-image-edit-2509", allow_download=False)
            typer.echo(f"✓ LoRA {name:17s} {source:32s} {info.key_style}, rank {info.rank}, {info.path}")
        except (LoraError, ModelNotAvailable) as exc:
            typer.secho(f"✗ LoRA {name:17s} {source:32s} {str(exc).splitlines()[0]}", fg=typer.colors.RED)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _dataset_items(folder: Path) -> tuple[list[TrainItem], str]:
    """Images (with same-name .txt captions when present) of a training_set folder
    (images/<id>.png + images/<id>.txt) or of a flat folder; and an md5 of them all."""
    import hashlib

    from flen_resources.trainers.flux_lora import TrainItem

    images_dir = folder / "images" if (folder / "images").is_dir() else folder
    digest = hashlib.md5()
    items = []
    for image in sorted(p for p in images_dir.iterdir()
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")):
        caption_file = image.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else None
        digest.update(image.name.encode() + b"\0" + image.read_bytes() + b"\0" + (caption or "").encode() + b"\0")
        items.append(TrainItem(image, caption or None))
    return items, digest.hexdigest()


@train_app.command("flux")
def train_flux(
    dataset: Annotated[Path, typer.Argument(help="Folder of images with same-name .txt captions (or a training_set "
                                                 "partition folder: images/<id>.png + .txt).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: checkpoints, cache, output/ (reused to resume).")],
    steps: Annotated[int, typer.Option(min=1)] = 1500,
    resolution: Annotated[int, typer.Option(min=64)] = 1024,
    rank: Annotated[int, typer.Option(min=1)] = 16,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-4,
    quantization: Annotated[Literal["none", "nf4"], typer.Option(help="nf4 (QLoRA) needs a CUDA GPU.")] = "nf4",
    optimizer: Annotated[Literal["adamw", "adamw8bit"], typer.Option()] = "adamw8bit",
    checkpoint_every: Annotated[Optional[int], typer.Option(
        min=1, help="Steps between checkpoints (default: 250, or a quarter of --steps when fewer).")] = None,
    seed: int = 0,
    compile: Annotated[bool, typer.Option(help="torch.compile the transformer blocks (GPU only).")] = True,
    attention: Annotated[Literal["auto", "cudnn", "flash"], typer.Option(
        help="Attention kernel on a GPU: cuDNN, torch's flash SDPA, or auto (cuDNN on Hopper and newer).")] = "auto",
    model: Annotated[str, typer.Option(envvar="FLEN_FLUX_MODEL", help="'tiny', a folder or a Hub id.")] = "tiny",
    name: Annotated[str, typer.Option(help="File name of the LoRA (default: the --out folder's name).")] = "",
    default_caption: Annotated[str, typer.Option(help="Caption of images without a .txt ('' to require one).")]
    = "photo of a person",
) -> None:
    """Train a FLUX.1-dev LoRA on DATASET; rerun the same command to resume from the last checkpoint."""
    from flen_resources.models.sources import ModelFolderError, ModelNotAvailable
    from flen_resources.trainers.common import LoraTrainConfig, TrainingError, checkpoint_interval
    from flen_resources.trainers.flux_lora import FluxLoraTrainer

    if not dataset.is_dir():
        _fail(f"{dataset} is not a folder")
    items, md5 = _dataset_items(dataset)
    config = LoraTrainConfig(max_steps=steps, resolution=resolution, rank=rank, alpha=float(rank), learning_rate=lr,
                             quantization=quantization, optimizer=optimizer,
                             checkpoint_every=checkpoint_interval(steps, checkpoint_every),
                             seed=seed, compile=compile, attention=attention)
    trainer = FluxLoraTrainer(model=model, work_dir=out, log=typer.echo)
    try:
        result = trainer.train(items, config, name=name or out.resolve().name, default_caption=default_caption,
                               dataset_md5=md5)
    except (TrainingError, ModelNotAvailable, ModelFolderError) as exc:
        _fail(f"{dataset}: {exc}")
    typer.echo(f"trained {result.steps} steps in {result.seconds:.0f}s"
               + (f" (resumed from step {result.resumed_from})" if result.resumed_from else ""))
    typer.echo(f"  LoRA (diffusers):  {result.lora_path}")
    typer.echo(f"  LoRA (ComfyUI):    {result.comfyui_path}")
    typer.echo(f"  loss curve:        {result.loss_curve}")


def main() -> None:  # pragma: no cover - console entry
    app()
