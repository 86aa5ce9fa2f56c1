"""``python -m dwskd.select``: the old name of :mod:`dwskd.select_student` (``dwskd-select``).

Kept so that earlier commands and imports work; the code lives in ``select_student.py``, whose
name a newcomer tells apart from :mod:`dwskd.selection` (the weight-selection functions).
"""

from dwskd.select_student import load_teacher, main, recipe_from_config, run  # noqa: F401

if __name__ == "__main__":
    main()
