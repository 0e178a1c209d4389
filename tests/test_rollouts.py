"""Rollout and config-version logic on a real SQLite registry, with acknowledgements played by
the test (the end-to-end run with real agents is in test_fleet_control.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from drivers.profiles import ProfileLibrary
from fleet.desired import DesiredConfigError, body_of, build_config
from fleet.registry import Registry, parse_target
from fleet.rollouts import RolloutError, Rollouts, parse_fraction, parse_stages
from fleet.settings import NodeSettings
from fleet.store import Store
from fleet.versions import Versions
from wire.control import Ack, AckStatus
from wire.gateway_config import Schedule

SITE = "school-1"


@pytest.fixture
def library() -> ProfileLibrary:
    return ProfileLibrary.load()


@pytest.fixture
def tree(tmp_path: Path, library: ProfileLibrary) -> tuple[Store, Registry]:
    store = Store(tmp_path / "fleet.db")
    registry = Registry(store, library)
    registry.add_site(SITE)
    registry.add_building(SITE, "a")
    registry.add_room(SITE, "room-1", "a")
    for n in range(1, 11):
        gateway = f"gw-{n:02d}"
        registry.add_gateway(SITE, gateway, building="a")
        registry.add_device(
            SITE,
            f"env-{n:02d}",
            gateway,
            "campussim-thc100",
            {"type": "modbus-tcp", "host": "127.0.0.1", "port": 1502 + n},
            room="room-1" if n == 1 else None,
        )
    return store, registry


def ack(versions: Versions, gateway: str, version: int, ok: bool = True) -> None:
    row = versions.get(SITE, gateway, version)
    assert row is not None
    with versions.store.transaction():
        versions.record_ack(
            SITE,
            gateway,
            Ack(
                kind="config",
                version=version,
                sha256=row["sha256"],
                status=AckStatus.APPLIED if ok else AckStatus.REJECTED,
                reason=None if ok else "could not apply: test",
                applied_version=version if ok else versions.applied_version(SITE, gateway),
                ts_ns=time.time_ns(),
            ),
        )


def answer_pending(
    versions: Versions, failing: frozenset[str] | set[str] = frozenset()
) -> list[str]:
    """Plays every gateway: each sent/pending version is applied, or rejected by `failing`."""
    answered = []
    rows = versions.store._rows(
        "SELECT gateway, version FROM config_versions WHERE state IN ('pending', 'sent')"
    )
    for row in rows:
        ack(versions, row["gateway"], row["version"], ok=row["gateway"] not in failing)
        answered.append(row["gateway"])
    return answered


def test_stages_are_cumulative_counts() -> None:
    assert parse_stages("1,10%,50%,100%", 20) == [1, 2, 10, 20]
    assert parse_stages("1,10%,50%,100%", 5) == [1, 3, 5]
    assert parse_stages("50%", 10) == [5, 10]
    assert parse_stages("3", 2) == [2]
    for bad in ("0", "x", "150%", "-1"):
        with pytest.raises(RolloutError, match="stage"):
            parse_stages(bad, 10)
    with pytest.raises(RolloutError, match="no gateways"):
        parse_stages("1", 0)
    assert parse_fraction("5%") == pytest.approx(0.05)
    assert parse_fraction("0.2") == pytest.approx(0.2)
    with pytest.raises(RolloutError):
        parse_fraction("100%")


def test_desired_config_inherits_down_the_tree(
    tree: tuple[Store, Registry], library: ProfileLibrary
) -> None:
    _store, registry = tree
    registry.set_settings(parse_target(f"site:{SITE}"), NodeSettings(interval_s=60, timeout_s=3))
    registry.set_settings(parse_target(f"room:{SITE}/room-1"), NodeSettings(interval_s=30))
    registry.set_settings(
        parse_target(f"building:{SITE}/a"),
        NodeSettings(
            alarms={"co2": {"high": 1000}},  # type: ignore[dict-item]
            schedules=[
                Schedule(id="night", at="22:00", days=["mon"], kinds=["sensor"], action="unknown")
            ],
        ),
    )
    # The schedule names a command the sensor does not have: the config is refused.
    with pytest.raises(DesiredConfigError, match="no command 'unknown'"):
        build_config(registry, library, SITE, "gw-01")
    registry.set_settings(
        parse_target(f"building:{SITE}/a"),
        NodeSettings(alarms={"co2": {"high": 1000}}),  # type: ignore[dict-item]
    )
    first = body_of(build_config(registry, library, SITE, "gw-01"))
    second = body_of(build_config(registry, library, SITE, "gw-02"))
    assert first["devices"][0]["interval_s"] == 30  # the room overrides the site
    assert second["devices"][0]["interval_s"] == 60
    assert first["devices"][0]["timeout_s"] == 3
    assert first["devices"][0]["alarms"] == {"co2": {"high": 1000.0}}
    # A rollout's settings sit at its target's level: lower levels still win, as they will
    # once the rollout is done and the settings are merged into the target.
    overlay = NodeSettings(interval_s=5)

    def interval(gateway: str, at: str) -> float:
        body = body_of(build_config(registry, library, SITE, gateway, overlay, at))
        return float(body["devices"][0]["interval_s"])

    assert interval("gw-02", f"site:{SITE}") == 5
    assert interval("gw-01", f"site:{SITE}") == 30  # its room says 30
    assert interval("gw-01", f"room:{SITE}/room-1") == 5


def test_versions_only_grow_and_same_content_is_not_pushed_twice(
    tree: tuple[Store, Registry], library: ProfileLibrary
) -> None:
    store, registry = tree
    versions = Versions(store)
    body = body_of(build_config(registry, library, SITE, "gw-01"))
    with store.transaction():
        first = versions.stage(SITE, "gw-01", body, origin="push", actor="t")
        again = versions.stage(SITE, "gw-01", body, origin="push", actor="t")
        forced = versions.stage(SITE, "gw-01", body, origin="push", actor="t", force=True)
    assert (first.version, again.version, forced.version) == (1, None, 2)
    with store.transaction():
        versions.mark_sent([(SITE, "gw-01", 2, "{}")])
    assert versions.get(SITE, "gw-01", 1)["state"] == "superseded"  # type: ignore[index]
    ack(versions, "gw-01", 2)
    (status,) = versions.status([(SITE, "gw-01")])
    assert status["in_sync"] and status["applied_version"] == 2


def run_ticks(rollouts: Rollouts, versions: Versions, failing: set[str], rounds: int) -> None:
    for _ in range(rounds):
        rollouts.tick(time.time_ns())
        answer_pending(versions, failing)


def test_rollout_goes_stage_by_stage_and_finishes(
    tree: tuple[Store, Registry], library: ProfileLibrary
) -> None:
    store, registry = tree
    rollouts = Rollouts(store, registry, library)
    versions = rollouts.versions
    rollout_id = rollouts.start(
        f"site:{SITE}", "1,50%,100%", "0%", NodeSettings(interval_s=7), 60, "tester"
    )
    rollouts.tick(time.time_ns())  # pushes the canary only
    pushed = answer_pending(versions)
    assert pushed == ["gw-01"]
    rollouts.tick(time.time_ns())  # canary acknowledged: stage 2 is next
    rollouts.tick(time.time_ns())
    assert sorted(answer_pending(versions)) == [f"gw-{n:02d}" for n in range(2, 6)]
    run_ticks(rollouts, versions, set(), 6)
    info = rollouts.get(rollout_id)
    assert info["state"] == "done", info
    assert rollouts.progress(rollout_id).applied == 10
    # The overlay is now the site's own setting.
    assert build_config(registry, library, SITE, "gw-09").devices[0].interval_s == 7


def test_rollout_halts_and_rolls_back_the_failed_stage(
    tree: tuple[Store, Registry], library: ProfileLibrary
) -> None:
    store, registry = tree
    rollouts = Rollouts(store, registry, library)
    versions = rollouts.versions
    # Every gateway runs version 1 first.
    with store.transaction():
        for n in range(1, 11):
            gateway = f"gw-{n:02d}"
            body = body_of(build_config(registry, library, SITE, gateway))
            versions.stage(SITE, gateway, body, origin="push", actor="t")
    answer_pending(versions)
    rollout_id = rollouts.start(
        f"site:{SITE}", "1,100%", "10%", NodeSettings(interval_s=9), 60, "tester"
    )
    run_ticks(rollouts, versions, {"gw-07", "gw-08"}, 4)
    info = rollouts.get(rollout_id)
    assert info["state"] == "halted", info
    members = {m["gateway"]: m for m in rollouts.gateways(rollout_id)}
    assert members["gw-01"]["status"] == "applied"
    for n in range(2, 11):
        assert members[f"gw-{n:02d}"]["status"] == "rolled_back"
    # The rollback is a new version with the old body.
    latest = versions.latest(SITE, "gw-05")
    assert latest is not None and latest["version"] == 3
    assert latest["origin"] == f"rollback:{rollout_id}"
    assert versions.body(SITE, "gw-05", 3) == versions.body(SITE, "gw-05", 1)
    # A halted rollout is not running: the next tick does nothing more.
    rollouts.tick(time.time_ns())
    assert versions.latest(SITE, "gw-05")["version"] == 3  # type: ignore[index]


def test_unanswered_gateways_time_out_and_count_as_failures(
    tree: tuple[Store, Registry], library: ProfileLibrary
) -> None:
    store, registry = tree
    rollouts = Rollouts(store, registry, library)
    rollout_id = rollouts.start(f"site:{SITE}", "1,100%", "50%", None, 5, "tester")
    start = time.time_ns()
    rollouts.tick(start)  # canary pushed, never answers
    rollouts.tick(start + 2_000_000_000)
    assert rollouts.get(rollout_id)["state"] == "running"
    rollouts.tick(start + 6_000_000_000)
    info = rollouts.get(rollout_id)
    assert info["state"] == "halted"
    (canary,) = [m for m in rollouts.gateways(rollout_id) if m["stage"] == 0]
    assert "no acknowledgement" in canary["reason"]


def test_pause_resume_abort_and_one_rollout_per_gateway(
    tree: tuple[Store, Registry], library: ProfileLibrary
) -> None:
    store, registry = tree
    rollouts = Rollouts(store, registry, library)
    rollout_id = rollouts.start(f"site:{SITE}", "1,100%", "0%", None, 60, "tester")
    with pytest.raises(RolloutError, match="in rollout"):
        rollouts.start(f"building:{SITE}/a", "100%", "0%", None, 60, "tester")
    assert rollouts.set_state(rollout_id, "pause") == "paused"
    rollouts.tick(time.time_ns())
    assert answer_pending(rollouts.versions) == []  # paused: nothing pushed
    with pytest.raises(RolloutError, match="not running"):
        rollouts.set_state(rollout_id, "pause")
    assert rollouts.set_state(rollout_id, "resume") == "running"
    rollouts.tick(time.time_ns())
    assert answer_pending(rollouts.versions) == ["gw-01"]
    assert rollouts.set_state(rollout_id, "abort", rollback=True) == "aborted"
    (canary,) = [m for m in rollouts.gateways(rollout_id) if m["gateway"] == "gw-01"]
    assert "nothing to roll back to" in canary["reason"]
    with pytest.raises(RolloutError, match="already aborted"):
        rollouts.set_state(rollout_id, "abort")


def test_a_schedule_set_high_in_the_tree_goes_to_the_gateways_it_concerns(
    tree: tuple[Store, Registry], library: ProfileLibrary
) -> None:
    _store, registry = tree
    registry.set_settings(
        parse_target(f"site:{SITE}"),
        NodeSettings(
            schedules=[
                Schedule(id="displays-off", at="22:00", kinds=["display"], action="power_off"),
                Schedule(
                    id="one-sensor",
                    at="07:00",
                    devices=["env-01", "env-02"],
                    action="power_off",  # a command the sensors lack: refused where it lands
                ),
            ]
        ),
    )
    # No display anywhere: nobody gets the 22:00 schedule, and gw-03 (no env-01/02) is valid.
    assert body_of(build_config(registry, library, SITE, "gw-03")).get("schedules", []) == []
    # gw-01 has env-01 only: the schedule is narrowed to it, and refused for its command.
    with pytest.raises(DesiredConfigError, match="no command 'power_off'"):
        build_config(registry, library, SITE, "gw-01")


def test_a_rollout_changed_by_the_cli_meanwhile_is_not_advanced(
    tree: tuple[Store, Registry], library: ProfileLibrary
) -> None:
    store, registry = tree
    rollouts = Rollouts(store, registry, library)
    target = f"gateway:{SITE}/gw-02"
    rollout_id = rollouts.start(target, "100%", "0%", NodeSettings(interval_s=7), 60, "tester")
    rollouts.tick(time.time_ns())
    answer_pending(rollouts.versions)  # every gateway applied: the next tick finishes it
    # The CLI (its own connection) aborts it between the service's read and its transaction.
    cli = Rollouts(Store(store.path), registry, library)
    service_transaction = store.transaction

    def racing() -> Any:
        if rollouts.get(rollout_id)["state"] == "running":
            cli.set_state(rollout_id, "abort")
        return service_transaction()

    store.transaction = racing  # type: ignore[method-assign]
    rollouts.tick(time.time_ns())
    store.transaction = service_transaction  # type: ignore[method-assign]
    assert rollouts.get(rollout_id)["state"] == "aborted"
    # Not merged into the gateway's settings, as a done rollout's would be.
    assert build_config(registry, library, SITE, "gw-02").devices[0].interval_s != 7


def test_a_paused_rollout_records_answers_but_starts_no_stage(
    tree: tuple[Store, Registry], library: ProfileLibrary
) -> None:
    store, registry = tree
    rollouts = Rollouts(store, registry, library)
    rollout_id = rollouts.start(f"site:{SITE}", "1,100%", "0%", None, 60, "tester")
    rollouts.tick(time.time_ns())
    rollouts.set_state(rollout_id, "pause")
    assert answer_pending(rollouts.versions) == ["gw-01"]
    rollouts.tick(time.time_ns())
    (canary,) = [m for m in rollouts.gateways(rollout_id) if m["stage"] == 0]
    assert canary["status"] == "applied", "the answer shows while paused"
    info = rollouts.get(rollout_id)
    assert (info["state"], info["stage"]) == ("paused", 0)
    rollouts.tick(time.time_ns())
    assert answer_pending(rollouts.versions) == [], "no new stage while paused"
    rollouts.set_state(rollout_id, "resume")
    run_ticks(rollouts, rollouts.versions, set(), 4)
    assert rollouts.get(rollout_id)["state"] == "done"


def test_aborting_a_halted_rollout_does_not_roll_back_twice(
    tree: tuple[Store, Registry], library: ProfileLibrary
) -> None:
    store, registry = tree
    rollouts = Rollouts(store, registry, library)
    versions = rollouts.versions
    with store.transaction():
        for n in range(1, 11):
            gateway = f"gw-{n:02d}"
            body = body_of(build_config(registry, library, SITE, gateway))
            versions.stage(SITE, gateway, body, origin="push", actor="t")
    answer_pending(versions)
    rollout_id = rollouts.start(
        f"site:{SITE}", "1,100%", "10%", NodeSettings(interval_s=9), 60, "tester"
    )
    run_ticks(rollouts, versions, {"gw-07", "gw-08"}, 4)
    assert rollouts.get(rollout_id)["state"] == "halted"
    assert versions.latest(SITE, "gw-05")["version"] == 3  # type: ignore[index]
    rollouts.set_state(rollout_id, "abort", rollback=True)
    assert versions.latest(SITE, "gw-05")["version"] == 3, "rolled back once only"  # type: ignore[index]
    # The canary, which kept the rollout's config, is the one rolled back now.
    assert versions.latest(SITE, "gw-01")["origin"] == f"rollback:{rollout_id}"  # type: ignore[index]
    assert "1 gateways rolled back" in rollouts.get(rollout_id)["message"]


def test_ack_timeouts_do_not_count_while_the_service_could_not_hear(
    tree: tuple[Store, Registry], library: ProfileLibrary
) -> None:
    store, registry = tree
    rollouts = Rollouts(store, registry, library)
    rollout_id = rollouts.start(f"site:{SITE}", "1,100%", "0%", None, 5, "tester")
    start = time.time_ns()
    rollouts.tick(start)
    # The service was down for a minute; back, it hears the gateways from `back` on.
    back = start + 60 * 10**9
    rollouts.tick(back + 10**9, heard_since_ns=back)
    assert rollouts.get(rollout_id)["state"] == "running"
    (canary,) = [m for m in rollouts.gateways(rollout_id) if m["stage"] == 0]
    assert canary["status"] == "pushed"
    rollouts.tick(back + 6 * 10**9, heard_since_ns=back)
    assert rollouts.get(rollout_id)["state"] == "halted"


def _ack(versions: Versions, gateway: str, version: int, **fields: Any) -> None:
    row = versions.get(SITE, gateway, version)
    assert row is not None
    values: dict[str, Any] = {
        "kind": "config",
        "version": version,
        "sha256": row["sha256"],
        "status": AckStatus.APPLIED,
        "applied_version": version,
        "ts_ns": time.time_ns(),
        **fields,
    }
    with versions.store.transaction():
        versions.record_ack(SITE, gateway, Ack(**values))


def test_an_answer_before_the_puback_is_kept(
    tree: tuple[Store, Registry], library: ProfileLibrary
) -> None:
    store, registry = tree
    versions = Versions(store)
    body = body_of(build_config(registry, library, SITE, "gw-01"))
    with store.transaction():
        versions.stage(SITE, "gw-01", body, origin="push", actor="t")
    # The gateway answers before the service saw the broker's PUBACK.
    _ack(versions, "gw-01", 1)
    with store.transaction():
        versions.mark_sent([(SITE, "gw-01", 1, '{"signed": 1}')])
    first = versions.get(SITE, "gw-01", 1)
    assert first is not None and first["state"] == "applied"
    assert first["document"] == '{"signed": 1}', "what was published is on record"


def test_a_refused_replay_is_reported_without_rewriting_history(
    tree: tuple[Store, Registry], library: ProfileLibrary
) -> None:
    store, registry = tree
    versions = Versions(store)
    body = body_of(build_config(registry, library, SITE, "gw-01"))
    with store.transaction():
        versions.stage(SITE, "gw-01", body, origin="push", actor="t")
        versions.mark_sent([(SITE, "gw-01", 1, "{}")])
    _ack(versions, "gw-01", 1)
    with store.transaction():
        versions.stage(SITE, "gw-01", body, origin="push", actor="t", force=True)
        versions.mark_sent([(SITE, "gw-01", 2, "{}")])
    _ack(versions, "gw-01", 2)
    # Version 1 replayed to the gateway, which runs 2: refused, reported, history kept.
    _ack(
        versions,
        "gw-01",
        1,
        status=AckStatus.REJECTED,
        reason="version 1 is older than the applied version 2: replay refused",
        applied_version=2,
    )
    assert versions.get(SITE, "gw-01", 1)["state"] == "applied"  # type: ignore[index]
    (status,) = versions.status([(SITE, "gw-01")])
    assert (status["last_status"], status["applied_version"]) == ("rejected", 2)
    assert "replay" in status["last_reason"]
    # An answer without a hash (a document that was not ours) marks none of our versions.
    _ack(versions, "gw-01", 2, sha256=None, status=AckStatus.REJECTED, reason="garbage")
    assert versions.get(SITE, "gw-01", 2)["state"] == "applied"  # type: ignore[index]


def test_a_dry_run_says_what_a_push_would_do(tmp_path: Path) -> None:
    from tests.conftest import run_cli, write_yaml

    store = Store(tmp_path / "fleet.db")
    library = ProfileLibrary.load()
    registry = Registry(store, library)
    registry.add_site(SITE)
    registry.add_gateway(SITE, "gw-01")
    registry.add_device(
        SITE, "env-01", "gw-01", "campussim-thc100", {"type": "modbus-tcp", "host": "127.0.0.1"}
    )
    versions = Versions(store)
    body = body_of(build_config(registry, library, SITE, "gw-01"))
    with store.transaction():
        versions.stage(SITE, "gw-01", body, origin="push", actor="t")
    _ack(versions, "gw-01", 1, status=AckStatus.REJECTED, reason="no", applied_version=0)
    config = write_yaml(tmp_path / "fleet.yaml", {"database": str(tmp_path / "fleet.db")})
    args = ("--config", str(config), "config", "push", f"site:{SITE}", "--dry-run", "--json")
    result = run_cli("campus-fleet", *args)
    assert result.returncode == 0, result.stderr
    # The same content was rejected: a push makes a new version of it, so it is a change.
    assert json.loads(result.stdout)["gateways"][0]["changed"] is True


def test_failures_exactly_at_the_limit_do_not_halt(tmp_path: Path, library: ProfileLibrary) -> None:
    store = Store(tmp_path / "fleet.db")
    registry = Registry(store, library)
    registry.add_site(SITE)
    gateways = [f"gw-{n:02d}" for n in range(1, 51)]
    for n, gateway in enumerate(gateways, start=1):
        registry.add_gateway(SITE, gateway)
        registry.add_device(
            SITE,
            f"env-{n:02d}",
            gateway,
            "campussim-thc100",
            {"type": "modbus-tcp", "host": "127.0.0.1", "port": 1502},
        )
    rollouts = Rollouts(store, registry, library)
    # 29 of 50 is 58 %: not more than 58 % (yet 0.58 * 50 is 28.999999999999996).
    rollout_id = rollouts.start(f"site:{SITE}", "100%", "58%", None, 60, "tester")
    run_ticks(rollouts, rollouts.versions, set(gateways[:29]), 3)
    info = rollouts.get(rollout_id)
    assert info["state"] == "done", info["message"]
    assert rollouts.progress(rollout_id).failed == 29


def test_a_resumed_rollout_still_rolls_back_to_what_ran_before_it(
    tree: tuple[Store, Registry], library: ProfileLibrary
) -> None:
    store, registry = tree
    rollouts = Rollouts(store, registry, library)
    versions = rollouts.versions
    with store.transaction():
        for n in range(1, 11):
            gateway = f"gw-{n:02d}"
            body = body_of(build_config(registry, library, SITE, gateway))
            versions.stage(SITE, gateway, body, origin="push", actor="t")
    answer_pending(versions)
    before = versions.body(SITE, "gw-05", 1)
    rollout_id = rollouts.start(
        f"site:{SITE}", "1,100%", "10%", NodeSettings(interval_s=9), 60, "tester"
    )
    for _ in range(4):
        rollouts.tick(time.time_ns())
        if rollouts.get(rollout_id)["state"] == "halted":
            break
        answer_pending(versions, {"gw-07", "gw-08"})
    assert rollouts.get(rollout_id)["state"] == "halted"
    # Resumed at once: gw-05 applied the rollout's v2, its rollback v3 is not answered yet.
    assert versions.applied_version(SITE, "gw-05") == 2
    rollouts.set_state(rollout_id, "resume")
    rollouts.tick(time.time_ns())
    (member,) = [m for m in rollouts.gateways(rollout_id) if m["gateway"] == "gw-05"]
    assert member["previous_version"] == 1
    answer_pending(versions, {"gw-07", "gw-08"})
    rollouts.tick(time.time_ns())
    assert rollouts.get(rollout_id)["state"] == "halted"
    latest = versions.latest(SITE, "gw-05")
    assert latest is not None and latest["origin"] == f"rollback:{rollout_id}"
    assert versions.body(SITE, "gw-05", latest["version"]) == before


def test_versions_start_above_what_the_gateway_runs_after_a_database_reset(
    tree: tuple[Store, Registry], library: ProfileLibrary
) -> None:
    from wire.models import GatewayState, Status

    store, registry = tree
    versions = Versions(store)
    with store.transaction():
        # The gateway reports it runs version 7, which this (restored) database never made.
        store.record_state(SITE, "gw-01", GatewayState(status=Status.ONLINE, config_version=7))
        staged = versions.stage(
            SITE,
            "gw-01",
            body_of(build_config(registry, library, SITE, "gw-01")),
            origin="push",
            actor="t",
        )
    assert staged.version == 8


def test_the_cli_says_when_the_service_is_not_connected_to_the_broker(
    tree: tuple[Store, Registry],
) -> None:
    from fleet.cli_control import service_problem, service_warning

    store, _registry = tree
    store.conn.execute(
        "INSERT INTO service (name, pid, started_ns, heartbeat_ns, signing_key, connected) "
        "VALUES ('fleet', 1, 0, ?, 'abc', 0)",
        (time.time_ns(),),
    )
    assert service_problem(store) is None  # running: a push waits for the broker
    assert "not connected to the broker" in (service_warning(store) or "")
    store.conn.execute("UPDATE service SET connected = 1")
    assert service_problem(store) is None
    assert service_warning(store) is None
