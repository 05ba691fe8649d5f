"""Applications built on the library: results tables (:mod:`.summarize`, :mod:`.table1`, the paper's numbers in
:mod:`.paper_results`) and figures (:mod:`.plot`). They read run directories and call ``fedlit fit``; the library
never imports them."""
