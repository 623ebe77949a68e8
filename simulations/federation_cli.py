"""``fedhead federation``: the operator's, the site's and a trial's commands for a secure federation.

Operator: ``init`` (CA and SuperLink certificate), ``enrol`` / ``revoke`` (a
site's node key at the SuperLink). Site: ``node-key`` (its key pair),
``join`` (its SuperNode, over TLS with its key). Trial: ``up`` / ``down``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from common.cli import ExitCode, check_run_name, parse_run_config, report_problem, stdout_console

__all__ = ["federation_app"]

federation_app = typer.Typer(
    name="federation",
    help="A federation over TLS with authenticated sites: certificates, node keys, enrolment, a local trial.",
    no_args_is_help=True,
)

_DIR_HELP = "The operator's federation folder (default: $FEDHEAD_HOME/federation)."
_SUPERLINK_HELP = "The SuperLink's address as the sites dial it, HOST:PORT."


@federation_app.command("init")
def init(
    folder: Annotated[Path | None, typer.Option("--dir", help=_DIR_HELP)] = None,
    host: Annotated[list[str] | None, typer.Option("--host", help="A name or address sites dial the SuperLink by (repeat; default 127.0.0.1 and localhost).")] = None,
    days: Annotated[int, typer.Option(min=1, help="Validity of the certificates, in days.")] = 365,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing CA and certificate.")] = False,
) -> None:
    """Make the federation's certificate authority and the SuperLink's TLS certificate."""
    from simulations.federation import DEFAULT_HOSTS, federation_dir, init_federation

    files = init_federation(federation_dir(folder), list(host or DEFAULT_HOSTS), days=days, force=force)
    console = stdout_console()
    console.print(f"CA: {files.ca.cert} (give it to every site; keep {files.ca.key.name} private)", soft_wrap=True)
    console.print(f"SuperLink certificate: {files.server.cert} for {', '.join(host or DEFAULT_HOSTS)}", soft_wrap=True)
    flags = " ".join(files.superlink_tls().flags())
    console.print(f"start the SuperLink with: flower-superlink {flags} --host 0.0.0.0 --port 8000", soft_wrap=True)


@federation_app.command("enrol")
def enrol(
    site: Annotated[str, typer.Argument(help="The site's name, as it will appear in every record.")],
    public_key: Annotated[Path, typer.Argument(help="The site's node public key (node-auth.pub from `fedhead federation node-key`).")],
    superlink: Annotated[str, typer.Option(help=_SUPERLINK_HELP)] = "127.0.0.1:8000",
    folder: Annotated[Path | None, typer.Option("--dir", help=_DIR_HELP)] = None,
) -> None:
    """Register a site's node key with the running SuperLink and record its node id in enrolment.json."""
    from simulations.federation import enrol_site, federation_dir

    files = federation_dir(folder)
    node_id = enrol_site(files, site, public_key, superlink=superlink)
    stdout_console().print(f"enrolled {site} as node {node_id}; runs name its replies by {files.enrolment} "
                           f"(run-config enrolment='{files.enrolment}')", soft_wrap=True)


@federation_app.command("revoke")
def revoke(
    site: Annotated[str, typer.Argument(help="An enrolled site's name.")],
    superlink: Annotated[str, typer.Option(help=_SUPERLINK_HELP)] = "127.0.0.1:8000",
    folder: Annotated[Path | None, typer.Option("--dir", help=_DIR_HELP)] = None,
) -> None:
    """Unregister a site's node key at the SuperLink: its SuperNode can no longer connect."""
    from simulations.federation import federation_dir, revoke_site

    node_id = revoke_site(federation_dir(folder), site, superlink=superlink)
    stdout_console().print(f"revoked {site} (node {node_id})")


@federation_app.command("node-key")
def node_key(
    state_dir: Annotated[Path, typer.Option(help="The site's state-dir; the key pair goes into its keys/ folder.")],
) -> None:
    """Make this site's node key pair (once); print the public half's path, to send to the operator."""
    from simulations.federation import make_site_key

    try:
        public = make_site_key(state_dir)
    except OSError as exc:
        report_problem(f"cannot write the node key under {state_dir}: {exc.strerror or exc}; give a --state-dir this user can write")
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    console = stdout_console()
    console.print(f"node public key: {public}", soft_wrap=True)
    console.print(f"send it to the operator (`fedhead federation enrol SITE {public.name}`); the private key stays here", soft_wrap=True)


@federation_app.command("join")
def join(
    superlink: Annotated[str, typer.Option(help=_SUPERLINK_HELP)],
    data_dir: Annotated[Path, typer.Option(help="The site's images: one folder per class (optionally under train/ and val/), or an .npz.")],
    state_dir: Annotated[Path, typer.Option(help="The site's state-dir: feature cache, privacy ledger, keys, receipts.")],
    site_name: Annotated[str, typer.Option(help="The name the site is enrolled under.")],
    ca: Annotated[Path | None, typer.Option(help="The federation's CA certificate (ca.crt from the operator).")] = None,
    policy: Annotated[Path | None, typer.Option(help="The site's privacy policy (TOML).")] = None,
    port: Annotated[int | None, typer.Option(help="This SuperNode's own local port (default: Flower's).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="INSECURE: no TLS, no node key. For a local test only.")] = False,
) -> None:
    """Start this site's SuperNode: TLS trusting the federation's CA, authenticated by the site's node key.

    Runs until stopped (Ctrl-C). If the SuperLink refuses the site, says why and who can fix it.
    """
    import os

    from simulations.federation import diagnose_supernode, site_key_paths, supernode_command
    from simulations.processes import flower_env, process_group, stop_on_signals

    private, public = site_key_paths(state_dir)
    if not insecure:
        missing = [f"{what} {path}" for what, path in (("CA certificate", ca), ("node key", private)) if path is None or not Path(path).is_file()]
        if missing:
            report_problem(f"cannot join securely: no {' and no '.join(missing)}; get ca.crt from the operator and make the "
                           "key with `fedhead federation node-key`, or pass --insecure for a local test")
            raise typer.Exit(ExitCode.BAD_INPUT)
    else:
        report_problem("INSECURE: this SuperNode talks to the SuperLink without TLS and without a node key")
    config = {"site-name": site_name, "data-dir": str(data_dir.resolve()), "state-dir": str(state_dir.resolve())}
    if policy:
        config["policy"] = str(policy.resolve())
    command = supernode_command(superlink=superlink, ca_cert=None if insecure else ca, private_key=None if insecure else private,
                                node_config=config, port=port)
    log_file = state_dir / "supernode.log"
    state_dir.mkdir(parents=True, exist_ok=True)
    env = flower_env(Path(os.environ.get("FLWR_HOME", str(state_dir / "flwr-home"))))
    stdout_console().print(f"starting the SuperNode of {site_name}; its log: {log_file}", soft_wrap=True)
    with stop_on_signals():
        try:
            with process_group(command, env, log_file) as process:
                process.wait()
        except KeyboardInterrupt:
            report_problem("stopped; the SuperNode and everything it started are stopped")
            raise typer.Exit(ExitCode.INTERRUPTED) from None
    if process.returncode:
        report_problem(diagnose_supernode(log_file.read_text(errors="replace"), process.returncode, superlink=superlink,
                                          ca_cert=ca, public_key=public))
        raise typer.Exit(ExitCode.BAD_INPUT)


@federation_app.command("up")
def up(
    sites: Annotated[int, typer.Option(min=1, help="Number of sites, each a SuperNode with its own image folder and state-dir.")] = 3,
    name: Annotated[str | None, typer.Option(help="Run folder name under run-dir (default: <UTC time>-<backbone>-<strategy>).")] = None,
    run_config: Annotated[str, typer.Option("--run-config", metavar="'K=V ...'", help="Run-config overrides, as for `fedhead simulate`.")] = "",
    policy: Annotated[list[str] | None, typer.Option("--policy", metavar="SITE=FILE", help="Give a site (site-<i>) a privacy policy file (repeat).")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show Flower's whole log stream.")] = False,
) -> None:
    """Run a trial federation on loopback: a SuperLink with TLS and node authentication, enrolled SuperNodes, the task.

    Stops every process it started when the run ends, fails or is interrupted.
    """
    from simulations.run_inputs import check_run_target
    from simulations.run_output import run_and_report
    from simulations.trial_federation import run_trial

    overrides = parse_run_config(run_config)
    if name is not None:
        check_run_name(name)
    check_run_target(num_sites=sites, name=name or "", overrides=overrides)
    policies = {}
    for item in policy or []:
        site, _, file = item.partition("=")
        if not site or not file or not Path(file).is_file():
            report_problem(f"--policy {item!r}: give SITE=FILE with an existing policy file, e.g. site-2=policy.toml")
            raise typer.Exit(ExitCode.BAD_INPUT)
        policies[site] = Path(file)
    run_and_report(lambda on_line: run_trial(num_sites=sites, name=name or "", overrides=overrides, on_line=on_line,
                                             policies=policies), verbose)


@federation_app.command("down")
def down(
    name: Annotated[str | None, typer.Option(help="Stop only this trial (the --name given to `up`); default: every one.")] = None,
) -> None:
    """Stop every process of a trial federation left running (e.g. by a killed `fedhead federation up`)."""
    from simulations.run_inputs import project_root
    from simulations.trial_federation import stop_trials

    if name is not None:
        check_run_name(name)
    stopped = stop_trials(project_root() / ".cache" / "fedhead", name)  # where `up` keeps its trials
    console = stdout_console()
    for line in stopped or [f"no trial federation {'named ' + repr(name) + ' ' if name else ''}is running"]:
        console.print(line)
