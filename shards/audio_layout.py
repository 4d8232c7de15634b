"""Where a dataset's audio is below --audio-dir: a bounded search for a folder by name, on a file system or S3.

Used by readers whose audio arrives in archives that unpack to deep, fixed paths (WavCaps), so that the files are
read where they are rather than moved. The search visits folders level by level, never enters a folder it matched
(those hold the audio files, possibly hundreds of thousands), and stops at `max_depth` levels or after
`max_folders` folders, whichever comes first.
"""

from __future__ import annotations

import os

from relret import storage

MAX_FOLDERS = 10_000
"""Folders a search lists at most (a guard against an --audio-dir such as / or a bucket's root)."""


def find_folders(root: str, name: str, max_depth: int, max_folders: int = MAX_FOLDERS) -> list[str]:
    """Every folder called `name` (ignoring case) at most `max_depth` levels below `root` (level 0: `root` itself),
    as paths or s3:// URLs, sorted; [] when `root` does not exist. Raises ValueError when the search would list more
    than `max_folders` folders."""
    wanted = name.lower()
    if root.rstrip("/").rsplit("/", 1)[-1].lower() == wanted:
        return [root]
    found: list[str] = []
    level, listed = [root], 0
    for _ in range(max_depth):
        below: list[str] = []
        for folder in level:
            listed += 1
            if listed > max_folders:
                raise ValueError(
                    f"searched {max_folders} folders below {root} for {name} without finishing; pass a folder "
                    f"closer to it as --audio-dir"
                )
            for child in subfolders(folder):
                url = storage.join(folder, child)
                (found if child.lower() == wanted else below).append(url)
        level = below
        if not level:
            break
    return sorted(found)


def subfolders(url: str) -> list[str]:
    """Names of the folders directly in `url` (local or s3://; on S3, the common prefixes below it), sorted."""
    if not storage.is_s3(url):
        try:
            with os.scandir(url) as entries:
                return sorted(e.name for e in entries if e.is_dir())
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return []
    bucket, prefix = storage.split_s3(url)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    names = []
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
    for page in pages:
        names += [p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
    return sorted(names)
