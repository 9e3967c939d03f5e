"""The ESCI sample (`sample://esci_us_titles`) read in its own column names.

ESCI-specific, yet in the core: two stages read it (align's retrieval pairs, `align/pairs.py`, and finetune's SFT /
demo data, `finetune/sft.py`, `finetune/demo.py`), and a stage never imports another stage's internals.
"""

from __future__ import annotations

from recforge.coerce import as_text
from recforge.readers import FileKey, SourceConfig, read_items, read_judgments, read_queries
from recforge.records import Judgment
from recforge.rejects import RejectLog


def read_esci(paths: tuple[str, str, str], keys: tuple[str, str, str], rejects: RejectLog
              ) -> tuple[dict[str, str], dict[str, str], list[Judgment]]:
    """The ESCI sample's queries, products and judgments in its own column names (`query_id`/`query`,
    `product_id`/`product_title`, `relevance`): (query id -> text, product id -> title, judgments).
    `keys` are the recipe keys of the three paths, for errors."""
    queries, products, judgments = paths
    query_text = {q.query_id: q.text for q in read_queries(
        SourceConfig(path=queries, id="query_id", fields={"text": "query"}), rejects, FileKey(keys[0]))}
    titles = {p.item_id: as_text(p.fields["title"]) for p in read_items(
        SourceConfig(path=products, id="product_id", fields={"title": "product_title"}), rejects, FileKey(keys[1]))}
    graded = read_judgments(SourceConfig(path=judgments, fields={"item_id": "product_id", "grade": "relevance"}),
                            rejects, FileKey(keys[2]))
    return query_text, titles, graded
