"""Reports: pages a reader can trust, on one kit (:mod:`.kit`, jinja2 templates in ``templates/``).

Pages: the evaluation report (:mod:`.eval`), the safety–quality trade-off (:mod:`.tradeoff`, its data in
:mod:`.methods`), the sanitize report (:mod:`.sanitize`) and the audit report (:mod:`.audit`). Every page
opens with what its figures are measured on (:mod:`.runs`) and marks figures that are not comparable,
with the reason (:mod:`.comparable`); charts (:mod:`.charts`) and images (:mod:`.images`) are shared.
Reports sit above the harness, the judges and the editing mechanics and are imported by none of them.
"""
