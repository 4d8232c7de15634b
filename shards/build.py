"""Build WebDataset shards with Sentence-BERT embeddings from an audio-caption dataset, on Ray.

On one machine (starts a private Ray on 127.0.0.1 and stops it at the end):

    python shards/build.py --dataset clotho --captions clotho_captions_development.csv \
        --audio-dir clotho/development --out shards/

On a Ray cluster (the script joins the cluster; see configs/ray/):

    ray submit configs/ray/aws.yaml shards/build.py -- --dataset wavcaps --captions /data/fsd_final.json \
        --audio-dir s3://bucket/wavcaps/FreeSound_flac --out s3://bucket/shards --blacklist /data/blacklist.json

The datasets' real layouts (`shards/readers.py`): AudioCaps audio named by another download tool takes
`--audio-template` (`Y{youtube_id}.wav`, `{audiocap_id}.wav`, `{youtube_id}_{start_time}.flac`); WavCaps audio is
found below the folder its zips were unpacked in (`--audio-dir /data/wavcaps_unzipped`), and `--blacklist` also takes
DCASE 2024 task 6's CSV of excluded Freesound ids. Missing audio files count against `--max-missing-fraction`
(AudioCaps: 0.05, since YouTube videos disappear), corrupt ones against `--max-skipped-fraction`.

`python shards/build.py --help` lists every option. The work is done by `shards.job` (this file is what `ray submit`
copies to the head node, so it only imports the installed package).
"""

import os
import sys

# Run as a script, Python puts this file's folder first on sys.path, which would make shards/'s modules (audio,
# progress, ...) importable as top-level names that shadow other packages. The job imports the installed package.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

from shards.job import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
