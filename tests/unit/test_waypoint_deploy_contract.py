"""The waypoint pod contract, offline: what the deployer writes into the
Deployment (agent/sources/waypoint_deploy.py) is a command `tether` parses,
whose bootstrap dials the socket the node agent serves for that waypoint
(waypoint.xds.socket_path) with the node id the xDS server admits; the
Service and status have Istio's shape."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest

pytest.importorskip("kubernetes")
pytest.importorskip("grpc")

from agent import cli
from agent.sources import waypoint_deploy as wd


def gw(listeners: list[dict[str, Any]] | None = None, **ann: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "wp",
            "namespace": "shop",
            "uid": "u-1",
            "generation": 3,
            "annotations": ann,
        },
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": listeners
            if listeners is not None
            else [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def test_pod_command_is_the_cli_and_dials_the_agents_socket(tmp_path: Any) -> None:
    from waypoint.xds import node_id, socket_path

    # as agent/app.py wires it: the deployer's xds_dir is <stateDir>/xds (the
    # real node found the waypoint dialling <stateDir>/xds/xds/... once)
    state_dir = tmp_path
    xds_dir = tmp_path / "xds"
    tpl = wd.pod_template(gw(), "img", str(xds_dir))
    (c,) = tpl["spec"]["containers"]
    assert c["command"][0] == "tether"
    args = cli.parser().parse_args([*c["command"][1:], "--print"])
    assert args.fn is cli._cmd_waypoint_proxy
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.fn(args) == 0
    boot = json.loads(out.getvalue())
    assert boot["node"]["id"] == node_id("shop", "wp")
    (ep,) = boot["static_resources"]["clusters"][0]["load_assignment"]["endpoints"]
    pipe = ep["lb_endpoints"][0]["endpoint"]["address"]["pipe"]["path"]
    assert pipe == str(socket_path(state_dir, "shop", "wp"))
    # the directory the socket is in is the host's, at the same path
    (vol,) = tpl["spec"]["volumes"]
    assert vol["hostPath"]["path"] == str(xds_dir)
    assert c["volumeMounts"] == [{"name": vol["name"], "mountPath": str(xds_dir)}]
    assert str(socket_path(state_dir, "shop", "wp")).startswith(str(xds_dir) + "/")
    # the kubelet's readiness probe hits the bootstrap's status listener, which
    # asks the admin's /ready; Envoy waits for its first config (no timeout)
    from waypoint.envoy import ADMIN_CLUSTER, READY_PATH

    probe = c["readinessProbe"]["httpGet"]
    (status,) = boot["static_resources"]["listeners"]
    assert status["address"]["socket_address"]["port_value"] == probe["port"] == 15021
    (route, _) = status["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"
    ][0]["routes"]
    assert route["match"]["path"] == probe["path"] == READY_PATH
    assert route["route"] == {"cluster": ADMIN_CLUSTER, "prefix_rewrite": "/ready"}
    admin = next(x for x in boot["static_resources"]["clusters"] if x["name"] == ADMIN_CLUSTER)
    ep = admin["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert ep["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": boot["admin"]["address"]["socket_address"]["port_value"],
    }
    assert boot["dynamic_resources"]["lds_config"]["initial_fetch_timeout"] == "0s"


def test_service_account_default_and_annotation() -> None:
    assert wd.service_account_of(gw()) == ("wp", True)
    named = gw(**{"gateway.istio.io/service-account": "mine"})
    assert wd.service_account_of(named) == ("mine", False)
    assert wd.pod_template(named, "i", "/x")["spec"]["serviceAccountName"] == "mine"


@pytest.mark.parametrize(
    "listeners",
    [
        [],
        [{"name": "mesh", "port": 15008, "protocol": "HTTP"}],
        [{"name": "mesh", "port": 15009, "protocol": "HBONE"}],
        [{"name": "other", "port": 15008, "protocol": "HBONE"}],
    ],
)
def test_invalid_listeners_are_not_accepted(listeners: list[dict[str, Any]]) -> None:
    g = gw(listeners)
    problem = wd._listener_problem(g)
    assert "{name: mesh, port: 15008, protocol: HBONE}" in problem
    st = wd.gateway_status(g, problem, [])
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Accepted"]["status"] == "False"
    assert conds["Accepted"]["reason"] == "ListenersNotValid"
    assert conds["Programmed"]["status"] == "False"
    assert all(c["observedGeneration"] == 3 for c in conds.values())


def test_status_keeps_transition_time_when_unchanged() -> None:
    g = gw()
    first = wd.gateway_status(g, "", ["10.96.0.7"])
    g["status"] = {**first}
    for c in g["status"]["conditions"]:
        c["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    again = wd.gateway_status(g, "", ["10.96.0.7"])
    assert all(c["lastTransitionTime"] == "2020-01-01T00:00:00Z" for c in again["conditions"])
    assert again["addresses"] == [{"type": "IPAddress", "value": "10.96.0.7"}]
    pending = wd.gateway_status(g, "", [])
    prog = next(c for c in pending["conditions"] if c["type"] == "Programmed")
    assert prog["status"] == "False" and prog["lastTransitionTime"] != "2020-01-01T00:00:00Z"
