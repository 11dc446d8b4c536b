"""What plugins share so that none imports another: folders and containment, hashing, weight patches, infotext codecs."""
