# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "imap4flags", "variables", "relational", "comparator-i;ascii-numeric"];
set "myflags" "";
addflag "myflags" ["x", "y"];
if hasflag "myflags" "y" { fileinto "y"; }
if hasflag :count "eq" :comparator "i;ascii-numeric" "myflags" "2" { fileinto "two"; }
