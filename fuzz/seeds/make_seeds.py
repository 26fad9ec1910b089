#!/usr/bin/env python3
"""Writes the fuzz targets' starting inputs into fuzz/seeds/<target>/.

Text seeds (YAML, JSON) are written as they are; the protobuf seeds are encoded here by hand
(a few lines of varint and length-delimited fields, so no protobuf package or protoc is
needed), and the inputs of the structured targets (connect_validate, cni_plugin) in the layout
fuzz/src/lib.rs's Reader reads: one-byte selectors, little-endian integers, and strings with a
one-byte length. Run it from anywhere: python3 fuzz/seeds/make_seeds.py
"""

import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- protobuf, by hand --------------------------------------------------------------------

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_varint(num, n):
    return varint(num << 3) + varint(n)


def field_bytes(num, b):
    if isinstance(b, str):
        b = b.encode()
    return varint(num << 3 | 2) + varint(len(b)) + b


def msg(*fields):
    return b"".join(fields)


# istio.workload.Port {service_port = 1, target_port = 2}
def port(service, target):
    return msg(field_varint(1, service), field_varint(2, target))


WAYPOINT = msg(  # GatewayAddress {hostname = 1 {namespace = 1, hostname = 2}, hbone_mtls_port = 3}
    field_bytes(1, msg(field_bytes(1, "shop"), field_bytes(2, "waypoint.shop.svc.cluster.local"))),
    field_varint(3, 15008),
)

WORKLOAD = msg(  # istio.workload.Workload
    field_bytes(20, "Kubernetes//Pod/shop/web-1"),
    field_bytes(1, "web-1"),
    field_bytes(2, "shop"),
    field_bytes(3, bytes([10, 250, 1, 2])),
    field_bytes(3, bytes.fromhex("fd000000000000000000000000000002")),
    field_varint(5, 1),  # HBONE
    field_bytes(7, "web"),
    field_bytes(8, WAYPOINT),
    field_bytes(9, "node-a"),
    # services map<string, PortList>: entry {key = 1, value = 2 {ports = 1}}
    field_bytes(22, msg(field_bytes(1, "shop/web.shop.svc.cluster.local"),
                        field_bytes(2, field_bytes(1, port(80, 8080))))),
    field_bytes(16, "shop/allow-frontend"),
    field_varint(17, 0),
)

SERVICE = msg(  # istio.workload.Service
    field_bytes(1, "web"),
    field_bytes(2, "shop"),
    field_bytes(3, "web.shop.svc.cluster.local"),
    field_bytes(4, msg(field_bytes(1, ""), field_bytes(2, bytes([10, 96, 0, 10])))),
    field_bytes(5, port(80, 8080)),
    field_bytes(6, "spiffe://cluster.local/ns/shop/sa/web"),
)

write("xds_address", "workload.pb", field_bytes(1, WORKLOAD))
write("xds_address", "service.pb", field_bytes(2, SERVICE))


def string_match(kind, s=""):  # StringMatch oneof: exact 1, prefix 2, suffix 3, presence 4
    return field_bytes(kind, s)


AUTHZ = msg(  # istio.security.Authorization
    field_bytes(1, "allow-frontend"),
    field_bytes(2, "shop"),
    field_varint(3, 2),  # WORKLOAD_SELECTOR
    field_varint(4, 0),  # ALLOW
    field_bytes(5, field_bytes(1, field_bytes(2, msg(  # rules[0].clauses[0].matches[0]
        field_bytes(3, string_match(1, "cluster.local/ns/shop/sa/frontend")),
        field_bytes(5, msg(field_bytes(1, bytes([10, 250, 0, 0])), field_varint(2, 16))),
        field_varint(9, 8080),
    )))),
)
DENY = msg(
    field_bytes(1, "deny-plaintext"),
    field_bytes(2, "istio-system"),
    field_varint(3, 1),  # NAMESPACE
    field_varint(4, 1),  # DENY
    field_bytes(5, field_bytes(1, field_bytes(2, field_bytes(4, string_match(4))))),
    field_varint(6, 1),  # dry_run
)
write("xds_authorization", "allow.pb", AUTHZ)
write("xds_authorization", "deny_dry_run.pb", DENY)

INFO = msg(field_bytes(1, "web-1"), field_bytes(2, "shop"), field_bytes(3, "web"))
write("zds_request", "add.pb", field_bytes(1, msg(field_bytes(1, "4f1c-a1"), field_bytes(2, INFO))))
write("zds_request", "del.pb", field_bytes(2, field_bytes(2, "4f1c-a1")))
write("zds_request", "snapshot_sent.pb", field_bytes(3, b""))
write("zds_request", "keep.pb", field_bytes(5, field_bytes(1, "4f1c-a1")))

# --- text ---------------------------------------------------------------------------------

ZTUNNEL_SHAPED = """\
workloads:
- uid: cluster1//v1/Pod/default/local
  name: local
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.1", "fd00::1"]
  protocol: HBONE
  node: local
  canonicalName: local
  canonicalRevision: v1
  workloadType: deployment
  workloadName: local-deploy
  network: ""
  status: Healthy
  netns: /run/netns/local
  labels: {app: local}
  authorizationPolicies: [default/deny-everything-else]
  services:
    "default/example.default.svc.cluster.local":
      80: 8080
- name: local-tcp
  namespace: default
  workloadIps: ["127.0.0.2"]
  protocol: TCP
  services: {}
services:
- name: example
  namespace: default
  hostname: example.default.svc.cluster.local
  vips: ["/10.0.0.1", "net1/fd00::10"]
  ports: {80: 8080}
  endpoints:
    e1: {workloadUid: "Kubernetes//Pod/default/local-tcp", port: {80: 9090}}
  subjectAltNames: []
policies:
- name: deny-everything-else
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - notPrincipals: [{Presence: {}}]
- name: allow-some
  namespace: default
  scope: WorkloadSelector
  action: Allow
  dryRun: true
  rules:
  - - - principals: [{Exact: "spiffe://cluster.local/ns/default/sa/a"}, {Prefix: "cluster.local/ns/x/"}]
        sourceIps: ["10.0.0.0/8", "fd00::1"]
        destinationPorts: [80, "8080"]
      - serviceAccounts: [{namespace: default, serviceAccount: b}]
"""

K8S_POLICIES = """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"], ipBlocks: ["10.0.0.0/8"]}}]
    to: [{operation: {ports: ["8080"], methods: ["GET"]}}]
    when: [{key: source.namespace, values: [shop]}, {key: destination.port, notValues: ["9090"]}]
  - {}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-plaintext
  namespace: istio-system
  annotations: {istio.io/dry-run: "true"}
spec:
  action: DENY
  rules:
  - from: [{source: {notPrincipals: ["*"], notNamespaces: [kube-system]}}]
...
---
# a broken one
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: shop}
spec:
  action: PERMIT
"""

write("local_config", "ztunnel_shaped.yaml", ZTUNNEL_SHAPED)
write("local_config", "with_k8s_policies.yaml", ZTUNNEL_SHAPED + K8S_POLICIES)
write("local_config", "only_k8s_policies.yaml", K8S_POLICIES)
write("k8s_policy_yaml", "policies.yaml", K8S_POLICIES)

POLICY = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "allow-frontend", "namespace": "shop",
                 "annotations": {"istio.io/dry-run": "false"}},
    "spec": {
        "selector": {"matchLabels": {"app": "web"}},
        "action": "ALLOW",
        "rules": [
            {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"],
                                  "namespaces": ["shop"], "remoteIpBlocks": ["10.0.0.0/8"]}}],
             "to": [{"operation": {"ports": ["8080"], "notPorts": ["9090"]}}],
             "when": [{"key": "source.ip", "values": ["10.1.0.0/16"]}]},
        ],
    },
}
write("k8s_policy_json", "policy.json", json.dumps(POLICY, indent=1))

CLUSTER = {
    "namespaces": [
        {"metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}},
        {"metadata": {"name": "legacy"}},
    ],
    "pods": [
        {"metadata": {"name": "web-7d4b9-abcde", "namespace": "shop",
                      "labels": {"app": "web", "version": "v1"},
                      "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                           "name": "web-7d4b9", "uid": "u1", "controller": True}]},
         "spec": {"serviceAccountName": "web", "nodeName": "node-a",
                  "containers": [{"name": "web", "ports": [{"name": "http", "containerPort": 8080}]}]},
         "status": {"phase": "Running", "podIP": "10.250.1.2",
                    "podIPs": [{"ip": "10.250.1.2"}, {"ip": "fd00::2"}],
                    "conditions": [{"type": "Ready", "status": "True"}]}},
        {"metadata": {"name": "old", "namespace": "legacy"},
         "spec": {"containers": []},
         "status": {"phase": "Running", "podIP": "10.250.1.3"}},
    ],
    "services": [
        {"metadata": {"name": "web", "namespace": "shop"},
         "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                  "selector": {"app": "web"},
                  "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
        {"metadata": {"name": "ext", "namespace": "shop"},
         "spec": {"clusterIP": "10.96.0.11", "ports": [{"name": "tcp", "port": 5432}]}},
    ],
    "endpointSlices": [
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "ext-1", "namespace": "shop",
                      "labels": {"kubernetes.io/service-name": "ext"}},
         "addressType": "IPv4",
         "ports": [{"name": "tcp", "port": 5432}],
         "endpoints": [{"addresses": ["10.250.1.2"], "conditions": {"ready": True}},
                       {"addresses": ["192.0.2.7"], "conditions": {"ready": False}}]},
    ],
    "policies": [dict(POLICY, apiVersion="security.istio.io/v1")],
}
write("k8s_translate", "cluster.json", json.dumps(CLUSTER, indent=1))

REQUEST = {"command": "ADD", "containerId": "sandbox-a1", "netns": "/var/run/netns/cni-1",
           "podNamespace": "shop", "podName": "a1", "podUid": "4f1c-a1",
           "ips": ["10.250.1.2", "fd00::2"]}
write("cni_wire", "add.json", json.dumps(REQUEST))
write("cni_wire", "del.json", json.dumps({"command": "DEL", "containerId": "sandbox-a1",
                                          "podNamespace": "shop", "podName": "a1"}))
write("cni_wire", "reply.json", json.dumps({"captured": False, "error": "not in the mesh"}))

# --- structured inputs (fuzz/src/lib.rs, Reader) -------------------------------------------

def rstr(s):
    if isinstance(s, str):
        s = s.encode()
    assert len(s) < 256
    return bytes([len(s)]) + s


def ip4(a):
    return bytes([0]) + bytes(a)


def ip6(hexstr):
    return bytes([1]) + bytes.fromhex(hexstr)


def opt(s):
    return bytes([0]) if s is None else bytes([1]) + rstr(s)


NETCONF = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "weft-cni",
           "failOpen": False, "excludeNamespaces": ["weft-system"],
           "prevResult": {"cniVersion": "1.0.0",
                          "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1"}],
                          "ips": [{"address": "10.250.1.2/24", "interface": 0},
                                  {"address": "fd00::2/64", "interface": 0}]}}
ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=a1;K8S_POD_UID=4f1c-a1"
for i, command in enumerate(["add", "del", "check", "status", "gc", "version"]):
    write("cni_plugin", f"{command}.bin",
          bytes([i]) + opt("sandbox-a1") + opt("/var/run/netns/cni-1") + opt(ARGS)
          + json.dumps(NETCONF).encode())
write("cni_plugin", "add_fail_open.bin",
      bytes([0]) + opt("sandbox-a1") + opt("/var/run/netns/cni-1") + opt(ARGS)
      + json.dumps(dict(NETCONF, failOpen=True)).encode())

# arrived_on, method, target selector + target, header count, headers, dest, client, baggage
ADDR = ip4([10, 250, 1, 2])
BAGGAGE = "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop"
TAIL = ADDR + struct.pack("<H", 8080) + ip4([10, 250, 1, 3]) + struct.pack("<H", 40000) + rstr(BAGGAGE)
write("connect_validate", "authority.bin",
      ADDR + rstr("CONNECT") + bytes([1]) + rstr("10.250.1.2:8080")
      + bytes([2]) + rstr("Forwarded") + rstr('for="10.250.1.3:40000"')
      + rstr("baggage") + rstr(BAGGAGE) + TAIL)
write("connect_validate", "address_v6.bin",
      ip6("fd000000000000000000000000000002") + rstr("CONNECT") + bytes([2])
      + ip6("fd000000000000000000000000000002") + struct.pack("<H", 80) + bytes([0]) + TAIL)
write("connect_validate", "uri_get.bin",
      ADDR + rstr("GET") + bytes([0]) + rstr("http://10.250.1.2:8080/x") + bytes([0]) + TAIL)


# --- dns_query: DNS packets as a pod's resolver sends them ------------------------------------

def dns_query(qid, name, qtype, edns=False, rd=True):
    flags = 0x0100 if rd else 0
    header = struct.pack(">HHHHHH", qid, flags, 1, 0, 0, 1 if edns else 0)
    qname = b"".join(bytes([len(l)]) + l.encode() for l in name.strip(".").split(".")) + b"\0"
    question = qname + struct.pack(">HH", qtype, 1)
    # OPT record: root name, type 41, UDP size 1232, no extended flags, no options.
    opt = b"\0" + struct.pack(">HHIH", 41, 1232, 0, 0) if edns else b""
    return header + question + opt


A, AAAA, TXT = 1, 28, 16
write("dns_query", "fqdn_a.bin", dns_query(0x4242, "backend.shop.svc.cluster.local", A))
write("dns_query", "short_aaaa.bin", dns_query(7, "backend", AAAA))
write("dns_query", "search_a.bin", dns_query(8, "backend.shop.svc.cluster.local.shop.svc.cluster.local", A))
write("dns_query", "other_ns_edns.bin", dns_query(9, "backend.other", A, edns=True))
write("dns_query", "headless_aaaa.bin", dns_query(10, "headless.shop.svc.cluster.local", AAAA))
write("dns_query", "wildcard_a.bin", dns_query(11, "x.wild.example", A))
write("dns_query", "txt_forwarded.bin", dns_query(12, "example.com", TXT, rd=False))
