"""GLaM / MassiveText-style data pipeline: raw text from several sources in, a clean weighted token dataset out.

Stages (each a pure function over one shard of documents, so any executor can run them):

1. ``sources``   read files (text, JSONL(.gz/.zst), Parquet, zip) and extract documents (Gutenberg, WikiExtractor,
                 lines, paragraphs); bad input becomes a reject record with a reason, never an exception.
2. ``filters``   Unicode/whitespace normalisation, then Gopher's quality and repetition heuristics.
3. ``quality``   a hashed n-gram linear classifier (GLaM); threshold or Pareto selection of web documents.
4. ``dedup``     exact (normalised-text hash) and near-duplicate (MinHash + LSH) removal across all sources.
5. ``mixture``   weighted (or per-epoch) sampling into train/validation token shards that ``sparselm train`` reads.
6. ``report``    Markdown + PNG report: what was removed, why, and what the mixture became.

``run.run_pipeline`` ties them together; ``sparselm data run CONFIG`` is the command line.
"""
