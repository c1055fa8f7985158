"""Reduced Meta Pseudo Labels (the paper's Appendix E): the large teacher labels the unlabeled
images once, offline (mpl_fast.reduced.label, into a mpl_fast.reduced.store.TeacherLabelStore),
and a small reduced teacher (mpl_fast.reduced.teacher.ReducedTeacher) turns those stored
distributions into the student's pseudo labels, trained by the MPL feedback."""

from mpl_fast.reduced.store import TeacherLabelStore, bytes_per_image
from mpl_fast.reduced.teacher import ReducedTeacher

__all__ = ["TeacherLabelStore", "ReducedTeacher", "bytes_per_image"]
