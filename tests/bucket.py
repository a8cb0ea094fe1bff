"""What an S3 store's bucket holds, for the tests: its objects, loose
(``objects/XX/<id>``) or in packs (``packs/…``, :mod:`dcmfs.storage.packs`),
read and tampered with through the server's own API (boto3), as an
attacker with write access to the bucket would."""

from __future__ import annotations

from dcmfs.storage.packs import PACKS, parse_table


class Bucket:
    def __init__(self, client, url: str) -> None:
        self.client = client
        self.bucket, self.prefix = url[5:].split("/", 1)

    def keys(self, sub: str = "") -> list[str]:
        """Names under the store's prefix (without it)."""
        out, token = [], None
        while True:
            kw = {"ContinuationToken": token} if token else {}
            page = self.client.list_objects_v2(Bucket=self.bucket,
                                               Prefix=f"{self.prefix}/{sub}", **kw)
            out += [o["Key"][len(self.prefix) + 1:] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket,
                                      Key=f"{self.prefix}/{key}")["Body"].read()

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=body)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")

    def objects(self) -> dict[bytes, tuple[str, int, int]]:
        """object id -> (key, first byte, end) of every object the bucket
        holds, by the pack tables (the newest pack wins) and the loose names."""
        out = {}
        for key in sorted(self.keys(PACKS)):
            body = self.get(key)
            for oid, offset, length in parse_table(body, len(body)):
                out[oid] = (key, offset, offset + length)
        for key in self.keys("objects/"):
            out[bytes.fromhex(key.rsplit("/", 1)[1])] = (key, 0, None)
        return out

    def where(self, oid: bytes) -> tuple[str, int, int | None]:
        found = self.objects().get(oid)
        assert found is not None, f"object {oid.hex()} is not in the bucket"
        return found

    def read(self, oid: bytes) -> bytes:
        key, start, end = self.where(oid)
        return self.get(key)[start:end]

    def replace(self, oid: bytes, data: bytes) -> None:
        """Put ``data`` where the object's bytes are (same length: the other
        objects of its pack stay where they are)."""
        key, start, end = self.where(oid)
        body = bytearray(self.get(key))
        end = len(body) if end is None else end
        assert len(data) == end - start, "a replacement must keep the length"
        body[start:end] = data
        self.put(key, bytes(body))

    def flip(self, oid: bytes, at: int) -> None:
        """XOR 0xFF into the object's byte ``at`` (negative: from its end)."""
        data = bytearray(self.read(oid))
        data[at] ^= 0xFF
        self.replace(oid, bytes(data))

    def remove(self, oid: bytes) -> str:
        """Delete the S3 object holding it (its whole pack); returns the key."""
        key = self.where(oid)[0]
        self.delete(key)
        return key
