"""`mor silo serve`: the silo's trained reward model behind mutually authenticated gRPC, under its policy.

Order of a run: the policy and kit are checked (a bad file fails before any
port opens); the workdir's round record is locked (a second server on the
same workdir stops here); the server starts on an mTLS port with health NOT_SERVING; the
port is reported (log line, and `--port-file` for scripts: the OS chooses it
when the config says port 0); the model is loaded; health turns SERVING. A
training running on the workdir refuses the start (the workdir's training
lock is held from before the port opens until the model and its report are
loaded, so they are one run's). On
SIGTERM or SIGINT the silo turns NOT_SERVING, stops accepting calls, lets the
in-flight ones finish for up to `drain_seconds`, records that it stopped,
writes a final signed checkpoint of its audit log and exits 0. Bad input never crashes it (the request checks and the authorizing
wrapper answer a status instead), and a reply is built whole before it is sent.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

from mor_secure.audit import AuditLog
from mor_secure.data import load_consortium
from mor_secure.models.reward_model import LocalResources
from mor_secure.pki.files import write_public
from mor_secure.pki.identity import Role, parse_identity
from mor_secure.pki.kits import CertKit
from mor_secure.policy import SiloAdmission, SiloPolicy, default_allowed_callers, load_policy
from mor_secure.privacy import PrivacyLedger
from mor_secure.secagg.provisioning import has_silo_material
from mor_secure.transport.authorization import DEFAULT_MAX_OPEN_STREAMS
from mor_secure.transport.server import RunningServer, ServerSettings, serve

from .audit_trail import SiloAuditTrail
from .config import ServeSettings, SiloConfig
from .secure_rounds import ROUND_RECORD, RoundRecord, SecureRounds
from .service import SiloService, ledger_summary, open_model_service, published_privacy_report
from .servicer import ROLES_BY_RPC, SERVICE_NAME, SiloServicer, servicer_registration
from .training import MODEL_DIR, REPORT_FILE, open_ledger, served_feature_cache_dir, training_lock

logger = logging.getLogger(__name__)
# Workers beyond the policy's calls and streams, for health checks and quick refusals while those are all taken.
SPARE_WORKERS = 2


def _checked_kit(config: SiloConfig) -> CertKit:
    kit = CertKit.load(config.serve.kit)  # refuses secrets others may read
    identity = kit.identity()
    if identity.role != Role.SILO or identity.name != config.name:
        raise ValueError(f"{kit.directory} is the kit of {identity}, not of mor://silo/{config.name}; point "
                         "serve.kit at this silo's own kit")
    return kit


def load_service(config: SiloConfig, policy: SiloPolicy, ledger: PrivacyLedger | None) -> SiloService:
    """The silo's service over its trained model, with its policy's limits and its ledger's public summary."""
    resources = LocalResources(base_model=config.base_model,
                               feature_cache=served_feature_cache_dir(config)
                               if config.architecture == "frozen_encoders" else None)
    service = open_model_service(config.name, config.workdir / MODEL_DIR, resources=resources, limits=policy.limits,
                                 ledger=ledger, allowed_objectives=frozenset(policy.allowed_objectives),
                                 max_weight=policy.max_weight)
    report = service.privacy_report
    if report is None:
        logger.warning("silo %r serves a model with no %s beside it: callers get no privacy claim", config.name,
                       REPORT_FILE)
    elif not report.private:
        logger.warning("silo %r serves a model that is NOT differentially private (%s); every caller's Describe "
                       "says so", config.name, "trained without DP" if not report.dp_enabled else f"noise {report.noise}")
    return service


def audit_log_path(config: SiloConfig) -> Path:
    """Where the silo's audit log is (serve.audit_log, default <workdir>/audit.db)."""
    return config.serve.audit_log or config.workdir / "audit.db"


def serving_policy(config: SiloConfig) -> tuple[SiloPolicy, str]:
    """The policy `config`'s silo serves under, and where it came from (for the audit log).

    Without a policy file, or where the file leaves `allowed_callers` out,
    the secure defaults of mor_secure/policy/schema.py for this consortium's
    own coordinator and auditors: a consortium that names its coordinator
    otherwise is not refused by every silo, and a file that only tightens a
    limit does not change who may call.
    """
    policy = None
    if config.serve is not None and config.serve.policy is not None:
        policy = load_policy(config.serve.policy)
        if "allowed_callers" in policy.model_fields_set:
            _refuse_callers_of_a_barred_role(policy, config.serve.policy)
            return policy, str(config.serve.policy)
    spec = load_consortium(config.consortium)
    callers = default_allowed_callers(coordinator=spec.coordinator, auditors=spec.auditors)
    if policy is not None:
        return policy.model_copy(update={"allowed_callers": callers}), (
            f"{config.serve.policy}, its callers the defaults for coordinator {spec.coordinator!r}")
    return SiloPolicy(allowed_callers=callers), ("no policy file: the secure defaults of mor_secure/policy/schema.py, "
                                                 f"for coordinator {spec.coordinator!r}")


def _refuse_callers_of_a_barred_role(policy: SiloPolicy, source: Path) -> None:
    """ValueError for a caller the policy lists on an RPC its role may never call: the roles table refuses it on
    every call (PERMISSION_DENIED), so the operator would learn of the mistake only from refused calls."""
    for rpc, callers in policy.allowed_callers.items():
        roles = ROLES_BY_RPC[f"/{SERVICE_NAME}/{rpc}"]
        barred = [caller for caller in callers if parse_identity(caller).role not in roles]
        if barred:
            raise ValueError(f"{source}: allowed_callers.{rpc} lists {', '.join(barred)}, but only "
                             f"{' or '.join(sorted(role.value for role in roles))} parties may call {rpc} on a silo "
                             "(every other role is refused whatever the policy says); remove them")


def server_settings(settings: ServeSettings, policy: SiloPolicy) -> ServerSettings:
    """The transport's settings for `policy`: a worker for every call it admits and every open stream, plus spares.

    An admitted call beyond the workers would be queued, not refused, and a
    health check would wait behind it; the spare workers answer health checks
    and refusals while the policy's every slot and stream is taken (the
    default policy's 4 calls and 2 streams: 8 workers).
    """
    workers = policy.max_concurrent_requests + DEFAULT_MAX_OPEN_STREAMS + SPARE_WORKERS
    return ServerSettings(host=settings.host, port=settings.port, max_workers=workers,
                          max_open_streams=DEFAULT_MAX_OPEN_STREAMS)


def start_silo_server(config: SiloConfig, *,
                      port_file: Path | None = None) -> tuple[RunningServer, SiloAuditTrail, RoundRecord]:
    """Start serving `config`'s silo (returns once health is SERVING).

    The workdir's round record is opened first: its lock refuses a second
    server on the same workdir before it touches the ledger, the audit log
    or a port (`RoundRecord`). Then the training lock, held until the model
    is loaded: a `mor silo train` running on the workdir refuses the start.
    """
    if config.serve is None:
        raise ValueError(f"silo {config.name!r} has no `serve:` section in its YAML (kit, policy, port); add one")
    kit = _checked_kit(config)
    policy, policy_source = serving_policy(config)
    if not (config.workdir / MODEL_DIR).is_dir():
        raise FileNotFoundError(f"{config.workdir / MODEL_DIR}: no trained reward model; run "
                                "`mor silo train --config <silo>.yaml` first")
    rounds = RoundRecord(config.workdir / ROUND_RECORD)
    try:
        # Held until the model and its report are loaded: a training replaces both, and a server loading them
        # meanwhile could serve one run's model under the other's report.
        with training_lock(config.workdir, refused="a training replaces the model and the privacy report beside "
                           "it, so serving starts once it has finished. Nothing was opened"):
            running, audit = _serve_model(config, kit, policy, policy_source, rounds, port_file)
    except BaseException:
        rounds.close()
        raise
    return running, audit, rounds


def _serve_model(config: SiloConfig, kit: CertKit, policy: SiloPolicy, policy_source: str, rounds: RoundRecord,
                 port_file: Path | None) -> tuple[RunningServer, SiloAuditTrail]:
    """`start_silo_server` once the workdir is its own: ledger, audit log, port, model, secure rounds."""
    settings = config.serve
    ledger = open_ledger(config) if config.training.dp.enabled else None
    # The report the service will publish (read under the same training lock, so of the same run): every entry
    # states whether the served model is differentially private, from the first one on.
    served_report = published_privacy_report(config.workdir / REPORT_FILE, config.workdir / MODEL_DIR)
    # One checkpoint per entry: every answer carries a signed tree head that covers its own entry.
    audit = SiloAuditTrail(AuditLog.for_kit(audit_log_path(config), kit, checkpoint_every_entries=1),
                           None if ledger is None else (lambda: ledger_summary(ledger)), served_report=served_report)
    servicer = SiloServicer(None)
    try:
        running = serve(kit=kit, crl_path=settings.crl or kit.crl_path, services=[servicer_registration(servicer)],
                        roles_by_rpc=ROLES_BY_RPC, admission=SiloAdmission(policy), audit=audit,
                        settings=server_settings(settings, policy))
    except BaseException:
        audit.close()  # a start that failed (a missing CRL, a port in use) leaves the log free for the next
        raise
    if port_file is not None:
        write_public(Path(port_file), (json.dumps({"port": running.port, "pid": os.getpid()}) + "\n").encode())
    logger.info("silo %s listening on %s:%d; loading its reward model", config.name, settings.host, running.port)
    try:
        audit.serving_started(silo=config.name, policy=policy, address=f"{settings.host}:{running.port}",
                              policy_source=policy_source)
        service = load_service(config, policy, ledger)
        secure = (SecureRounds(service, kit, minimum_participants=policy.minimum_participants,
                               revocations=running.revocations, rounds=rounds)
                  if has_silo_material(kit) else None)
        if secure is None:
            logger.warning("silo %s: its kit holds no secure-aggregation keys, so it answers clear rounds only "
                           "(the coordinator then sees its weighted scores); provision them with `mor pki issue`",
                           config.name)
        servicer.ready(service, secure=secure)
    except BaseException:
        running.stop(0)
        audit.close()
        raise
    running.set_serving(True)
    logger.info("silo %s SERVING on %s:%d", config.name, settings.host, running.port)
    return running, audit


def serve_until_signalled(config: SiloConfig, *, port_file: Path | None = None) -> int:
    """Run the silo server until SIGTERM/SIGINT, then drain and exit 0."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    running, audit, rounds = start_silo_server(config, port_file=port_file)
    stop.wait()
    logger.info("silo %s draining (up to %.0f s for in-flight calls)", config.name, config.serve.drain_seconds)
    running.stop(config.serve.drain_seconds)
    audit.serving_stopped(silo=config.name)
    audit.close()
    rounds.close()
    logger.info("silo %s stopped", config.name)
    return 0
