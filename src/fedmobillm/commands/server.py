"""`fedmobillm server start` (alias `fedmobillm serve`, in commands/serve.py): run the training
server; `fedmobillm server status`: ask a running server for its fleet and trainer state;
`fedmobillm server quarantine [--release DEVICE_ID]`: devices with offences, and release;
`fedmobillm server devices`: every registered device; `fedmobillm server revoke DEVICE_ID
[--delete-data]`: refuse a device's token from now on (and delete its samples)."""

from __future__ import annotations

import argparse
import json
import os

from fedmobillm.commands import serve
from fedmobillm.device_runtime.messages import (
    ROUTE_DEVICE_REVOKE,
    ROUTE_DEVICES,
    ROUTE_QUARANTINE,
    ROUTE_QUARANTINE_DEVICE,
    ROUTE_STATUS,
    DeviceFlag,
    DeviceInfo,
    Revoked,
    RevokeRequest,
)
from fedmobillm.errors import FedMobiLLMError

NAME = "server"
HELP = (
    "the training server: start it (alias: `fedmobillm serve`), or ask a running one for "
    "its status (devices, samples, trainer, validation)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = sub.add_parser(
        "start", help=serve.HELP + " (alias: `fedmobillm serve`)", description=serve.HELP
    )
    serve.add_arguments(start)
    st = sub.add_parser("status", help="devices, samples per device/architecture, trainer state")
    _client_arguments(st)
    q = sub.add_parser(
        "quarantine",
        help="devices with offences (refused impossible uploads, non-finite steps) and the "
        "quarantined ones; --release lifts a quarantine",
    )
    q.add_argument("--release", metavar="DEVICE_ID", default=None, help="release this device")
    _client_arguments(q)
    d = sub.add_parser(
        "devices",
        help="every registered device: id, name, architecture, samples, last upload, "
        "quarantined or revoked",
    )
    _client_arguments(d)
    r = sub.add_parser(
        "revoke",
        help="revoke a device: its token is refused (401) from now on; its samples stay "
        "in the store unless --delete-data",
    )
    r.add_argument("device_id", metavar="DEVICE_ID", help="the device (see `server devices`)")
    r.add_argument(
        "--delete-data",
        action="store_true",
        help="also delete its samples from the store; the trainer stops using them",
    )
    _client_arguments(r)


def _client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="http://127.0.0.1:8000", help="server URL")
    p.add_argument(
        "--admin-token", default=None, help="admin token (default: $FEDMOBILLM_ADMIN_TOKEN)"
    )
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds")


def fetch_status(server: str, token: str, timeout: float = 10.0) -> dict:
    return _admin_request("GET", server, ROUTE_STATUS, token, timeout).json()


def _admin_request(
    method: str, server: str, route: str, token: str, timeout: float, body: dict | None = None
):
    import httpx

    try:
        r = httpx.request(
            method,
            f"{server.rstrip('/')}{route}",
            headers={"Authorization": f"Bearer {token}"},
            json=body,
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise FedMobiLLMError(
            f"cannot reach {server}: {exc}", hint="is `fedmobillm serve` running there?"
        ) from exc
    if r.status_code in (401, 403):
        raise FedMobiLLMError(
            f"{server} refused the admin token ({r.status_code})",
            hint="pass the token the server was started with",
        )
    if r.status_code == 404:
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        raise FedMobiLLMError(body.get("detail", f"{route}: not found"), hint=body.get("hint"))
    if r.status_code not in (200, 204):
        raise FedMobiLLMError(f"{server} answered {r.status_code}: {r.text[:300]}")
    return r


def format_status(st: dict) -> str:
    t = st.get("trainer", {})
    task = t.get("task") or st.get("task") or "classify"
    head = f"task: {task}" + ("" if task == "lm" else f"  label names: {st.get('label_names')}")
    lines = [head, "", "architectures:"]
    for arch, a in st.get("architectures", {}).items():
        lines.append(
            f"  {arch:<48} devices {a['devices']:>3}  train {a['train']:>7}  "
            f"validation {a['validation']:>6}  anchor {a.get('anchor', 0):>6}"
        )
    lines += ["", "devices:"]
    for d in st.get("devices", []):
        s = d["samples"]
        lines.append(
            f"  {d['device_id']:<22} {d['name']:<20} train {s['train']:>6}  "
            f"validation {s['validation']:>5}  anchor {s.get('anchor', 0):>5}  {d['architecture']}"
        )
    lines += [
        "",
        f"trainer: running={t.get('running')} step={t.get('step')} "
        f"loss={_fmt(t.get('loss'))} samples/s={_fmt(t.get('samples_per_s'))} "
        f"checkpoint_step={t.get('checkpoint_step')} "
        f"shared_anchors={t.get('shared_anchors', 0)}",
        f"  weights finite={t.get('weights_finite')} skipped non-finite steps="
        f"{t.get('skipped_steps', 0)} quarantined={t.get('quarantined', [])} "
        f"dropped samples={sum((t.get('dropped_samples') or {}).values())}",
    ]
    for h in (t.get("history") or [])[-5:]:
        accs = ", ".join(_metrics(a, m) for a, m in h.get("validation", {}).items())
        lines.append(f"  step {h['step']:>6}  loss {_fmt(h.get('train_loss'))}  {accs}")
    for arch, b in (t.get("best_validation") or {}).items():
        metric = t.get("best_metric", "accuracy")
        lines.append(f"  best {arch}: {metric} {_fmt(b.get(metric))} at step {b.get('step')}")
    return "\n".join(lines)


def _metrics(arch: str, m: dict) -> str:
    """One architecture's validation metrics: accuracy (classify) or perplexity, the frozen
    model's perplexity and next-token top-1/top-3 (lm)."""
    if "perplexity" in m:
        return (
            f"{arch}: ppl {m['perplexity']:.2f} (frozen {_fmt(m.get('frozen_perplexity'))}) "
            f"top1 {m['next_token_top1']:.3f} top3 {m['next_token_top3']:.3f} (n={m['n']})"
        )
    return f"{arch}: acc {m['accuracy']:.3f} (n={m['n']})"


def _fmt(x: object) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def run(args: argparse.Namespace) -> int:
    if args.action == "start":
        return serve.run(args)
    token = args.admin_token or os.environ.get("FEDMOBILLM_ADMIN_TOKEN")
    if not token:
        raise FedMobiLLMError(
            "no admin token", hint="pass --admin-token or set FEDMOBILLM_ADMIN_TOKEN"
        )
    if args.action == "quarantine":
        return _quarantine(args, token)
    if args.action == "devices":
        return _devices(args, token)
    if args.action == "revoke":
        return _revoke(args, token)
    st = fetch_status(args.server, token, args.timeout)
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0


def _quarantine(args: argparse.Namespace, token: str) -> int:
    if args.release:
        route = ROUTE_QUARANTINE_DEVICE.format(device_id=args.release)
        _admin_request("DELETE", args.server, route, token, args.timeout)
        print(json.dumps({"released": args.release}) if args.json else f"released {args.release}")
        return 0
    rows = _admin_request("GET", args.server, ROUTE_QUARANTINE, token, args.timeout).json()
    flags = [DeviceFlag.from_dict(r) for r in rows]
    if args.json:
        print(json.dumps([f.to_dict() for f in flags], indent=2))
        return 0
    if not flags:
        print("no device has offences")
    for f in flags:
        state = "QUARANTINED" if f.quarantined is not None else "counted"
        print(
            f"{f.device_id:<22} {f.name:<20} {state:<11} offences {f.offences:>3}  {f.last_reason}"
        )
    return 0


def _devices(args: argparse.Namespace, token: str) -> int:
    rows = _admin_request("GET", args.server, ROUTE_DEVICES, token, args.timeout).json()
    devices = [DeviceInfo.from_dict(r) for r in rows]
    if args.json:
        print(json.dumps([d.to_dict() for d in devices], indent=2))
        return 0
    print(format_devices(devices))
    return 0


def format_devices(devices: list[DeviceInfo]) -> str:
    if not devices:
        return "no devices registered"
    lines = [
        f"{'DEVICE':<22} {'NAME':<20} {'TRAIN':>6} {'VAL':>5} {'LAST UPLOAD':<19} "
        f"{'STATE':<11} {'EPSILON':<8} ARCHITECTURE"
    ]
    for d in devices:
        state = "revoked" if d.revoked is not None else "active"
        state = "quarantined" if d.quarantined and d.revoked is None else state
        state += " (data deleted)" if d.data_deleted else ""
        lines.append(
            f"{d.device_id:<22} {d.name:<20} {d.samples.train:>6} {d.samples.validation:>5} "
            f"{_when(d.last_upload):<19} {state:<11} {_epsilon(d):<8} {d.architecture}"
        )
    return "\n".join(lines)


def _epsilon(d: DeviceInfo) -> str:
    """The device's declared epsilon (with "+L" for label randomised response), "none"."""
    p = d.privacy
    if p is None:
        return "none"
    return f"{p.epsilon:g}" + (f"+L{p.label_epsilon:g}" if p.label_epsilon is not None else "")


def _when(t: float | None) -> str:
    import time

    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _revoke(args: argparse.Namespace, token: str) -> int:
    route = ROUTE_DEVICE_REVOKE.format(device_id=args.device_id)
    body = RevokeRequest(delete_data=args.delete_data).to_dict()
    out = Revoked.from_dict(
        _admin_request("POST", args.server, route, token, args.timeout, body).json()
    )
    if args.json:
        print(json.dumps(out.to_dict(), indent=2))
        return 0
    print(f"revoked {out.device_id}: its token is refused from now on")
    if args.delete_data:
        print(f"deleted {out.deleted_samples} samples from the store (the trainer drops them)")
    else:
        print("its samples stay in the store (--delete-data removes them)")
    return 0
