"""Generation as a block: backends that answer prompts (:mod:`.backends`), the request cache (:mod:`.cache`), the
registered rollouts (:mod:`.rollouts`) and the synthesis stage that maps a dataset through them (:mod:`.synthesis`).
"""
