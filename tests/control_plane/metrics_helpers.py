"""Helpers of the metrics tests: a free loopback port and a scrape of the metrics listener over
real HTTP, parsed with prometheus-client's own parser."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Scrape:
    text: str

    def value(self, name: str, **labels: str) -> float | None:
        """The sample ``name`` with exactly ``labels`` (``None`` when absent)."""
        for family in text_string_to_metric_families(self.text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return None

    def names(self) -> set[str]:
        """Every sample name the scrape can carry (counters' ``_total``, histograms' parts)."""
        names: set[str] = set()
        for family in text_string_to_metric_families(self.text):
            names.add(family.name)
            names.update(s.name for s in family.samples)
            suffixes = {
                "counter": ("_total", "_created"),
                "histogram": ("_bucket", "_count", "_sum", "_created"),
            }.get(family.type, ())
            names.update(family.name + suffix for suffix in suffixes)
        return names


async def scrape(port: int) -> Scrape:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)
