"""Where an S3 store's endpoint, region and credentials come from.

Never from argv (a secret there is in ``ps`` and in shell histories), in
this order: ``--s3-credentials-file PATH`` (private, like a key file),
``--s3-credentials-fd N``, the systemd credential ``dcmfs.s3``
(``LoadCredential=dcmfs.s3:/etc/dcmfs/pacs.s3``), then the usual AWS
environment variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), which the S3 client reads
itself.  The text is ``name = value`` lines (``#`` comments): ``endpoint``,
``region``, ``access_key_id``, ``secret_access_key``.
"""

from __future__ import annotations

import argparse
import os

from . import keys
from ..config import S3Settings
from ..errors import SecretError

CREDENTIAL_NAME = "dcmfs.s3"
_FIELDS = {"endpoint": "endpoint", "endpoint_url": "endpoint", "region": "region",
           "access_key_id": "access_key_id", "aws_access_key_id": "access_key_id",
           "secret_access_key": "secret_access_key",
           "aws_secret_access_key": "secret_access_key"}


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("S3 stores (endpoint, region and credentials; default: the AWS "
                             "environment variables)")
    g.add_argument("--s3-credentials-file", metavar="PATH",
                   help="file of 'name = value' lines: endpoint, region, access_key_id, "
                   "secret_access_key (mode 0600)")
    g.add_argument("--s3-credentials-fd", metavar="N", type=int,
                   help="read those lines from file descriptor N")


def parse(text: bytes, source: str) -> S3Settings:
    """The settings ``text`` holds.

    Raises
    ------
    SecretError
        A line that is not ``name = value`` of a known name.
    """
    values: dict[str, str] = {}
    for n, line in enumerate(text.decode("utf-8", "replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        name, sep, value = line.partition("=")
        field = _FIELDS.get(name.strip().lower())
        if not sep or field is None:
            # the line may hold a secret: say where, never what
            raise SecretError(f"Line {n} of the S3 credentials from {source} is not "
                              "'name = value' of endpoint, region, access_key_id or "
                              "secret_access_key.")
        values[field] = value.strip()
    if ("access_key_id" in values) != ("secret_access_key" in values):
        raise SecretError(f"The S3 credentials from {source} need both access_key_id and "
                          "secret_access_key.")
    return S3Settings(**values)


def settings(args) -> S3Settings | None:
    """The S3 settings the command line (or systemd) names; None: the
    environment's."""
    allow_open = getattr(args, "allow_open_key_file", False)
    path = getattr(args, "s3_credentials_file", None)
    if path:
        return parse(keys.read_file(path, "S3 credentials file", allow_open), path)
    fd = getattr(args, "s3_credentials_fd", None)
    if fd is not None:
        return parse(keys.read_fd(fd), f"fd {fd}")
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and os.path.exists(os.path.join(creds, CREDENTIAL_NAME)):
        path = os.path.join(creds, CREDENTIAL_NAME)
        return parse(keys.read_file(path, "S3 credential", allow_open), path)
    return None
