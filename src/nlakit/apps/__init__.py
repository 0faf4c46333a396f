"""Uses of an NLA: the viewer (serve), steering, model diffing and the auditing game."""
