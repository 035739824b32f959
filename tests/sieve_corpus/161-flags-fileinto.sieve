# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "imap4flags"];
fileinto :flags "\\Flagged" "Important";
