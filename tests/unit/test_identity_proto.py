"""The CA service definition: wire names and field numbers as Istio's, generated code current."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import struct_pb2

from agent.identity.proto import ca_pb2, ca_pb2_grpc, generate


def test_generated_code_is_current(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert [p.name for p in written] == list(generate.GENERATED)
    for path in written:
        committed = generate.PROTO_DIR / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run `python agent/identity/proto/generate.py`"
        )


def test_wire_names_and_field_numbers_match_istio() -> None:
    # istio/api security/v1alpha1/ca.proto
    fd = ca_pb2.DESCRIPTOR
    assert fd.package == "istio.v1.auth"
    svc = fd.services_by_name["IstioCertificateService"]
    assert svc.full_name == "istio.v1.auth.IstioCertificateService"
    method = svc.methods_by_name["CreateCertificate"]
    assert method.input_type.full_name == "istio.v1.auth.IstioCertificateRequest"
    assert method.output_type.full_name == "istio.v1.auth.IstioCertificateResponse"
    req = ca_pb2.IstioCertificateRequest.DESCRIPTOR
    assert {f.name: f.number for f in req.fields} == {
        "csr": 1,
        "validity_duration": 3,
        "metadata": 4,
    }
    metadata_type = req.fields_by_name["metadata"].message_type
    assert metadata_type is not None and metadata_type.full_name == "google.protobuf.Struct"
    assert (
        req.fields_by_name["validity_duration"].type
        == req.fields_by_name["validity_duration"].TYPE_INT64
    )
    resp = ca_pb2.IstioCertificateResponse.DESCRIPTOR
    assert {f.name: f.number for f in resp.fields} == {"cert_chain": 1, "root_cert": 2}
    assert {f.name: f.number for f in ca_pb2.Roots.DESCRIPTOR.fields} == {"ca_cert": 1}
    assert hasattr(ca_pb2_grpc, "IstioCertificateServiceStub")


def test_impersonation_travels_in_the_struct() -> None:
    req = ca_pb2.IstioCertificateRequest(csr="x", validity_duration=86400)
    req.metadata.update({"ImpersonatedIdentity": "spiffe://cluster.local/ns/a/sa/b"})
    back = ca_pb2.IstioCertificateRequest.FromString(req.SerializeToString())
    assert isinstance(back.metadata, struct_pb2.Struct)
    assert back.metadata.fields["ImpersonatedIdentity"].string_value.endswith("/ns/a/sa/b")
    # Tags on the wire: csr field 1 (0x0a), validity_duration field 3 varint (0x18),
    # metadata field 4 length-delimited (0x22).
    assert ca_pb2.IstioCertificateRequest(csr="x").SerializeToString()[:1] == b"\x0a"
    assert ca_pb2.IstioCertificateRequest(validity_duration=1).SerializeToString() == b"\x18\x01"
    only_md = ca_pb2.IstioCertificateRequest()
    only_md.metadata.update({"k": "v"})
    assert only_md.SerializeToString()[:1] == b"\x22"
