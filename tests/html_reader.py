"""Reads a lightning_tda HTML report back for tests: its queries with their proponents and opponents, its figures,
and anything that would load from outside the page."""

from __future__ import annotations

from html.parser import HTMLParser


class ReportParser(HTMLParser):
    """Collects queries with their proponents/opponents, and anything that would load from outside."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: dict[tuple[str, int], dict[str, list[int]]] = {}
        self.current: dict[str, list[int]] | None = None
        self.external: list[str] = []
        self.scripts = 0
        self.figures = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section" and "data-query-id" in attrs:
            self.current = {"proponent": [], "opponent": []}
            self.queries[(attrs["data-method"], int(attrs["data-query-id"]))] = self.current
        if tag == "li" and attrs.get("class") in ("proponent", "opponent"):
            self.current[attrs["class"]].append(int(attrs["data-train-id"]))
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            value = attrs.get(key)
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)
        if tag == "img" and attrs.get("class") == "figure":
            self.figures += 1
