"""Shared pytest set-up for raytag's tests."""

from tests.ray_cluster import ray_cluster  # noqa: F401  (registers the fixtures)
from tests.s3_server import aws_env, s3_server  # noqa: F401
