# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "imap4flags"];
setflag ["$Label1", "$Junk"];
if hasflag :matches "$L*" { fileinto "label"; }
