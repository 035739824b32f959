# envelope: from=alice@example.org to=francois@example.fr message=messages/encoded.eml
require ["fileinto"];
if header :contains "subject" "=?UTF-8?" {
  fileinto "yes";
} else {
  fileinto "no";
}
