"""The private descriptor pool of the generated REAPI modules (see `_regenerate.py`).

It starts with the well-known types the REAPI protos import, so that the generated files can be
added to it without touching protobuf's default pool.
"""

from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    empty_pb2,
    timestamp_pb2,
    wrappers_pb2,
)

POOL = descriptor_pool.DescriptorPool()
for _module in (any_pb2, descriptor_pb2, duration_pb2, empty_pb2, timestamp_pb2, wrappers_pb2):
    POOL.AddSerializedFile(_module.DESCRIPTOR.serialized_pb)
