//! Frame codec and message types of the coworkvm host and guest protocols.
