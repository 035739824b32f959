# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require "imap4flags";
setflag ["\\Seen", "\\Flagged", "custom"];
removeflag "\\Flagged";
