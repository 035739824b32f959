# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["variables"];
set "who" "carol";
redirect "${who}@example.net";
