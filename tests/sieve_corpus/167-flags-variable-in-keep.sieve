# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["imap4flags", "variables"];
set "f" "";
addflag "f" "\\Draft";
keep :flags "${f}";
